//! The FUSE adapter (fuser 0.18): translates kernel requests into [`Model`] calls and
//! errors into errnos. Requests that can be slow (content I/O, open/close, fsync) are
//! handed to a worker pool so that one fetch or fsync wait never stalls the session's
//! reader threads; metadata requests are answered inline (they only touch SQLite).

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyIoctl,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, SessionACL, TimeOrNow, WriteFlags,
};

use super::backend::ChunkBackend;
use super::index::{Attr, Kind, Ts};
use super::model::{DriveOptions, FsError, Model, SetAttr, TimeSet};
use crate::keys::DataKey;

/// How long the kernel may cache attributes and entries. Only this process changes the
/// filesystem, so a short TTL costs nothing in correctness.
const TTL: Duration = Duration::from_secs(1);
/// At a clean unmount, how long pending uploads may go without progress before the
/// process exits anyway (they resume at the next mount).
const FINISH_QUIET: Duration = Duration::from_secs(60);

/// Everything needed to mount a drive.
pub struct DriveConfig {
    /// Where to mount.
    pub mountpoint: PathBuf,
    /// Index and staging area (`index.sqlite`, `staging/`).
    pub state_dir: PathBuf,
    /// The user's data key.
    pub data_key: DataKey,
    /// Where chunks go.
    pub backend: Arc<dyn ChunkBackend>,
    /// Let other users use the mount (`allow_other`; needs `user_allow_other` in
    /// /etc/fuse.conf for non-root users).
    pub allow_other: bool,
    /// Unmount automatically when the process dies (via fusermount3).
    pub auto_unmount: bool,
    /// Kernel reader threads.
    pub fuse_threads: usize,
    /// Worker threads for slow requests.
    pub workers: usize,
    /// Largest write request the kernel sends (None: fuser's default).
    pub max_write: Option<u32>,
    /// Kernel write-back cache (off by default: writes then reach the drive in order and
    /// mtimes are the drive's).
    pub writeback_cache: bool,
    /// Model tunables.
    pub options: DriveOptions,
    /// Read-only mount (`ro`): the kernel mount is read-only and every change is refused
    /// with EROFS.
    pub read_only: bool,
    /// Present every file as owned by this user (`uid=N`) instead of its stored owner.
    pub uid: Option<u32>,
    /// Present every file as owned by this group (`gid=N`) instead of its stored group.
    pub gid: Option<u32>,
    /// The mount's source as `mount`/`findmnt` show it (`fsname=`; default `peerstash`).
    pub fsname: String,
}

impl DriveConfig {
    /// A configuration with the defaults.
    pub fn new(
        mountpoint: impl Into<PathBuf>,
        state_dir: impl Into<PathBuf>,
        data_key: DataKey,
        backend: Arc<dyn ChunkBackend>,
    ) -> DriveConfig {
        DriveConfig {
            mountpoint: mountpoint.into(),
            state_dir: state_dir.into(),
            data_key,
            backend,
            allow_other: false,
            auto_unmount: true,
            fuse_threads: 4,
            workers: 8,
            max_write: None,
            writeback_cache: false,
            options: DriveOptions::default(),
            read_only: false,
            uid: None,
            gid: None,
            fsname: "peerstash".into(),
        }
    }
}

impl DriveConfig {
    /// Apply comma-separated `-o` options: `allow_other`, `auto_unmount`/`noauto_unmount`,
    /// `max_write=BYTES`, `writeback_cache`, `cache_size=BYTES`, `fsync_timeout=SECS`,
    /// `nosync_on_close`, `threads=N`, `ro`, `uid=N`, `gid=N`, `fsname=NAME`,
    /// `default_permissions` (always on). `cache_size` also takes `500M`-style sizes.
    /// Generic options that fstab and systemd pass along (`rw`, `defaults`, `_netdev`,
    /// `nofail`, `noauto`, `auto`, `user`, `users`, `nouser`, `dev`, `nodev`, `suid`,
    /// `nosuid`, `exec`, `noexec`, `atime`, `noatime`, `relatime`, `x-*`, `comment=`) are
    /// ignored. Unknown options are an error.
    pub fn apply_options(&mut self, opts: &str) -> Result<(), String> {
        fn num<T: std::str::FromStr>(k: &str, v: Option<&str>) -> Result<T, String> {
            v.and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("mount option {k} needs a number"))
        }
        for opt in opts.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let (k, v) = match opt.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (opt, None),
            };
            match k {
                "allow_other" => self.allow_other = true,
                "auto_unmount" => self.auto_unmount = true,
                "noauto_unmount" => self.auto_unmount = false,
                "writeback_cache" => self.writeback_cache = true,
                "nosync_on_close" => self.options.sync_on_close = false,
                "max_write" => self.max_write = Some(num(k, v)?),
                "cache_size" => {
                    self.options.cache_bytes = v
                        .and_then(|v| crate::client::parse_size(v).ok())
                        .and_then(|n| usize::try_from(n).ok())
                        .ok_or("mount option cache_size needs a size (bytes, or e.g. 512M)")?
                }
                "ro" => self.read_only = true,
                "uid" => self.uid = Some(num(k, v)?),
                "gid" => self.gid = Some(num(k, v)?),
                "fsname" => {
                    self.fsname = v
                        .filter(|v| !v.is_empty())
                        .ok_or("mount option fsname needs a value")?
                        .to_string()
                }
                "default_permissions" => {}
                "fsync_timeout" => self.options.fsync_timeout = Duration::from_secs(num(k, v)?),
                "threads" => self.fuse_threads = num(k, v)?,
                "snapshot_interval" => {
                    self.options.snapshot_interval = Duration::from_secs(num(k, v)?)
                }
                "snapshot_keep" => {
                    self.options.snapshot_keep = v
                        .and_then(super::snapshot::parse_duration)
                        .ok_or("mount option snapshot_keep needs a time (seconds, or e.g. 30d, 12h)")?
                }
                // Accepted for fstab/systemd mount units, which pass them along.
                "rw" | "defaults" | "nofail" | "_netdev" | "noauto" | "auto" | "user" | "users"
                | "nouser" | "owner" | "group" | "dev" | "nodev" | "suid" | "nosuid" | "exec"
                | "noexec" | "atime" | "noatime" | "relatime" | "strictatime" | "nodiratime"
                | "async" | "comment" => {}
                k if k.starts_with("x-") => {}
                other => {
                    return Err(format!(
                        "unknown mount option {other:?} (known: allow_other, auto_unmount, noauto_unmount, \
                         max_write=N, writeback_cache, cache_size=SIZE, fsync_timeout=S, nosync_on_close, threads=N, \
                         ro, uid=N, gid=N, fsname=NAME, default_permissions, snapshot_interval=S, snapshot_keep=TIME)"
                    ))
                }
            }
        }
        Ok(())
    }
}

/// Why mounting failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The index or staging area could not be opened.
    #[error("opening the drive state: {0}")]
    Model(#[from] FsError),
    /// The kernel mount failed (is /dev/fuse there, is fusermount3 installed, is the
    /// mountpoint an empty directory?).
    #[error("mounting: {0} (is fuse3 installed and the mountpoint an existing directory?)")]
    Mount(#[source] io::Error),
    /// Waiting for signals failed.
    #[error("signal handling: {0}")]
    Signal(#[source] io::Error),
}

/// A mounted drive; dropping it unmounts.
pub struct MountHandle {
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
}

impl MountHandle {
    /// The mountpoint.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmount and wait for the session to end: the drive first uploads what is pending,
    /// while it makes progress (see [`Model::finish_uploads`]).
    /// The unmount is lazy: a process still inside the mount keeps it alive until it leaves.
    pub fn unmount(mut self) -> io::Result<()> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> io::Result<()> {
        let Some(s) = self.session.take() else {
            return Ok(());
        };
        if !s.guard.is_finished() {
            // With auto_unmount fuser only closes its socket to fusermount3 and leaves the
            // unmount to it, which was seen not to happen: unmount explicitly, so the
            // session ends and join returns.
            detach(&self.mountpoint);
        }
        s.umount_and_join()
    }

    /// Whether the session has ended (e.g. unmounted from outside).
    pub fn is_finished(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.guard.is_finished())
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            tracing::warn!("unmounting {}: {e}", self.mountpoint.display());
        }
    }
}

/// Lazily unmount `mnt`: directly when privileged, else through fusermount3.
fn detach(mnt: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(mnt.as_os_str().as_bytes()) else {
        return;
    };
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        return;
    }
    let status = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(mnt)
        .stdin(std::process::Stdio::null())
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        tracing::warn!("fusermount3 -u -z {} failed: {status:?}", mnt.display());
    }
}

fn fuse_config(cfg: &DriveConfig) -> Config {
    let mut c = Config::default();
    c.mount_options = vec![
        MountOption::FSName(cfg.fsname.clone()),
        MountOption::Subtype("peerstash".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    if cfg.auto_unmount {
        c.mount_options.push(MountOption::AutoUnmount);
    }
    if cfg.read_only {
        c.mount_options.push(MountOption::RO);
    }
    c.acl = if cfg.allow_other {
        SessionACL::All
    } else if cfg.auto_unmount {
        // fusermount3 needs allow_root (or allow_other) for auto_unmount.
        SessionACL::RootAndOwner
    } else {
        SessionACL::Owner
    };
    c.n_threads = Some(cfg.fuse_threads.max(1));
    c
}

fn build(cfg: DriveConfig) -> Result<(DriveFs, Config), MountError> {
    let model = Model::new(
        &cfg.state_dir,
        &cfg.data_key,
        cfg.backend.clone(),
        cfg.options.clone(),
    )?;
    let fs = DriveFs {
        model: Arc::new(model),
        pool: Pool::new(cfg.workers.max(1)),
        max_write: cfg.max_write,
        writeback_cache: cfg.writeback_cache,
        read_only: cfg.read_only,
        owner: Owner {
            uid: cfg.uid,
            gid: cfg.gid,
        },
    };
    Ok((fs, fuse_config(&cfg)))
}

/// Mount the drive in background threads; the returned handle unmounts on drop.
pub fn mount(cfg: DriveConfig) -> Result<MountHandle, MountError> {
    let mountpoint = cfg.mountpoint.clone();
    // A drive whose process was killed leaves a dead mount ("Transport endpoint is not
    // connected") when auto-unmount could not run (files were open): clear it first.
    if let Err(e) = std::fs::metadata(&mountpoint) {
        if e.raw_os_error() == Some(libc::ENOTCONN) {
            tracing::warn!(
                "{}: clearing a dead mount left by an earlier run",
                mountpoint.display()
            );
            detach(&mountpoint);
        }
    }
    let (fs, config) = build(cfg)?;
    let session = fuser::spawn_mount(fs, &mountpoint, &config).map_err(MountError::Mount)?;
    Ok(MountHandle {
        session: Some(session),
        mountpoint,
    })
}

/// Mount and serve until SIGINT or SIGTERM (then unmount cleanly, upload what is
/// pending, and on a second signal stop without waiting for that) or until unmounted
/// from outside (`fusermount3 -u`, `umount`).
///
/// Call it from the main thread before other threads (e.g. a tokio runtime) exist: it
/// blocks the two signals in the calling thread, and threads started earlier would still
/// take them with the default action (the process dies; nothing is lost — pending uploads
/// resume at the next mount — but the unmount is left to fusermount3's auto-unmount).
/// Embedders that own their shutdown signal use [`run_foreground_until`].
pub fn run_foreground(cfg: DriveConfig) -> Result<(), MountError> {
    let set = block_stop_signals().map_err(MountError::Signal)?;
    let mut handle = Some(mount(cfg)?);
    let mut unmounting: Option<std::thread::JoinHandle<io::Result<()>>> = None;
    let timeout = libc::timespec {
        tv_sec: 0,
        tv_nsec: 200_000_000,
    };
    loop {
        let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
        if sig == libc::SIGINT || sig == libc::SIGTERM {
            if let Some(h) = handle.take() {
                tracing::info!("signal {sig}: unmounting (again to skip pending uploads)");
                unmounting = Some(std::thread::spawn(move || h.unmount()));
            } else {
                // The mount is gone already; what is not uploaded stays staged and goes
                // out at the next mount, as after a crash.
                tracing::warn!("signal {sig} again: leaving pending uploads for the next mount");
                return Ok(());
            }
        }
        if handle.as_ref().is_some_and(|h| h.is_finished()) {
            return handle
                .take()
                .map_or(Ok(()), |h| h.unmount())
                .map_err(MountError::Mount);
        }
        if unmounting.as_ref().is_some_and(|t| t.is_finished()) {
            let t = unmounting.take().expect("checked");
            return t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("unmount panicked")))
                .map_err(MountError::Mount);
        }
    }
}

/// Block SIGINT and SIGTERM in the calling thread (and so in every thread it starts
/// afterwards), returning the set for `sigtimedwait`. Call it before starting any thread
/// (an async runtime, say) so that only [`run_foreground`] sees those signals.
pub fn block_stop_signals() -> io::Result<libc::sigset_t> {
    // SAFETY: plain signal-mask calls on a zeroed, initialised sigset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(set)
    }
}

/// Mount and serve until `stop()` returns true (polled every 100 ms) or the drive is
/// unmounted from outside; then unmount cleanly. For embedders with their own shutdown
/// signal (tests, `local-cluster`).
pub fn run_foreground_until(
    cfg: DriveConfig,
    mut stop: impl FnMut() -> bool,
) -> Result<(), MountError> {
    let handle = mount(cfg)?;
    while !stop() && !handle.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
    }
    handle.unmount().map_err(MountError::Mount)
}

type Job = Box<dyn FnOnce() + Send>;

/// A fixed pool of threads for slow requests.
struct Pool {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
}

impl Pool {
    fn new(n: usize) -> Pool {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..n {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("peerstash-fuse-{i}"))
                .spawn(move || loop {
                    let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                })
                .expect("spawn worker thread");
        }
        Pool {
            tx: Mutex::new(Some(tx)),
        }
    }

    fn run(&self, job: impl FnOnce() + Send + 'static) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match tx {
            Some(tx) => {
                if let Err(mpsc::SendError(job)) = tx.send(Box::new(job)) {
                    job();
                }
            }
            None => job(),
        }
    }
}

struct DriveFs {
    model: Arc<Model>,
    pool: Pool,
    max_write: Option<u32>,
    writeback_cache: bool,
    read_only: bool,
    owner: Owner,
}

/// The owner files are presented with (`uid=`/`gid=`), if not their stored one.
#[derive(Clone, Copy)]
struct Owner {
    uid: Option<u32>,
    gid: Option<u32>,
}

/// Refuse a change on a read-only mount (the kernel refuses most already; this covers
/// the rest, e.g. setxattr).
macro_rules! refuse_if_ro {
    ($self:ident, $reply:ident) => {
        if $self.read_only {
            $reply.error(Errno::EROFS);
            return;
        }
    };
}

fn errno(e: FsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

fn to_fuse(a: &Attr, owner: Owner) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.atime.into(),
        mtime: a.mtime.into(),
        ctime: a.ctime.into(),
        crtime: a.ctime.into(),
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: owner.uid.unwrap_or(a.uid),
        gid: owner.gid.unwrap_or(a.gid),
        rdev: a.rdev,
        // cp and friends size their buffers by st_blksize: large is faster through FUSE.
        blksize: 128 * 1024,
        flags: 0,
    }
}

fn time_set(t: Option<TimeOrNow>) -> Option<TimeSet> {
    t.map(|t| match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(s) => TimeSet::At(Ts::from(s)),
    })
}

fn entry(reply: ReplyEntry, r: Result<Attr, FsError>, owner: Owner) {
    match r {
        Ok(a) => reply.entry(&TTL, &to_fuse(&a, owner), Generation(0)),
        Err(e) => reply.error(errno(e)),
    }
}

fn empty(reply: ReplyEmpty, r: Result<(), FsError>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

fn xattr_reply(reply: ReplyXattr, r: Result<Vec<u8>, FsError>, size: u32) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(errno(e)),
    }
}

impl Filesystem for DriveFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Some(w) = self.max_write {
            if let Err(max) = config.set_max_write(w) {
                let _ = config.set_max_write(max);
            }
        }
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        if self.writeback_cache {
            let _ = config.add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE);
        }
        Ok(())
    }

    fn destroy(&mut self) {
        // Unmounted cleanly: a user who unmounts a backup drive expects what they copied
        // in to be on the peers when the process exits, not at the next mount.
        self.model.finish_uploads(FINISH_QUIET);
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        entry(reply, self.model.lookup(parent.0, name), self.owner);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let owner = self.owner;
        match self.model.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &to_fuse(&a, owner)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: time_set(atime),
            mtime: time_set(mtime),
            ctime: ctime.map(Ts::from),
        };
        refuse_if_ro!(self, reply);
        let (model, owner) = (self.model.clone(), self.owner);
        let answer = move |reply: ReplyAttr| match model.setattr(ino.0, set) {
            Ok(a) => reply.attr(&TTL, &to_fuse(&a, owner)),
            Err(e) => reply.error(errno(e)),
        };
        // Times, modes and owners (what `cp -a` sets on every file) are answered here; a
        // truncate that must fetch the content it keeps goes to a worker.
        if self.model.setattr_is_local(ino.0, size) {
            answer(reply)
        } else {
            self.pool.run(move || answer(reply))
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.model.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        refuse_if_ro!(self, reply);
        entry(
            reply,
            self.model
                .mknod(parent.0, name, mode, umask, rdev, req.uid(), req.gid()),
            self.owner,
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        refuse_if_ro!(self, reply);
        entry(
            reply,
            self.model
                .mkdir(parent.0, name, mode, umask, req.uid(), req.gid()),
            self.owner,
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        refuse_if_ro!(self, reply);
        empty(reply, self.model.unlink(parent.0, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        refuse_if_ro!(self, reply);
        empty(reply, self.model.rmdir(parent.0, name));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        refuse_if_ro!(self, reply);
        entry(
            reply,
            self.model
                .symlink(parent.0, link_name, target, req.uid(), req.gid()),
            self.owner,
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        refuse_if_ro!(self, reply);
        empty(
            reply,
            self.model
                .rename(parent.0, name, newparent.0, newname, flags.bits()),
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        refuse_if_ro!(self, reply);
        entry(
            reply,
            self.model.link(ino.0, newparent.0, newname),
            self.owner,
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.read_only
            && (flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0)
        {
            reply.error(Errno::EROFS);
            return;
        }
        let model = self.model.clone();
        self.pool.run(move || match model.open(ino.0, flags.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // Local content and chunks a read-ahead brought are answered here; a fetch goes
        // to a worker so it holds up no other request.
        match self.model.read_cached(fh.0, offset, size) {
            Some(Ok(d)) => return reply.data(&d),
            Some(Err(e)) => return reply.error(errno(e)),
            None => {}
        }
        let model = self.model.clone();
        self.pool
            .run(move || match model.read_data(fh.0, offset, size) {
                Ok(d) => reply.data(&d),
                Err(e) => reply.error(errno(e)),
            });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        refuse_if_ro!(self, reply);
        // Writes to local files are answered here (a thread hand-off per request was a
        // large part of a small-file copy); a first write that must fetch the current
        // content goes to a worker.
        if self.model.writes_locally(fh.0) {
            return match self.model.write(fh.0, offset, data) {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno(e)),
            };
        }
        let model = self.model.clone();
        let data = data.to_vec();
        self.pool
            .run(move || match model.write(fh.0, offset, &data) {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno(e)),
            });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Local work only (a data sync and an index commit).
        empty(reply, self.model.flush(fh.0));
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.model.release(fh.0));
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let model = self.model.clone();
        self.pool.run(move || empty(reply, model.fsync(fh.0)));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.model.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.model.readdir(fh.0, offset) {
            Ok(entries) => {
                for (next, e) in entries {
                    if reply.add(
                        INodeNo(e.ino),
                        next,
                        file_type(e.kind),
                        OsStr::from_bytes_compat(&e.name),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.model.releasedir(fh.0));
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.model.fsyncdir());
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.model.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bfree, s.files, s.ffree, s.bsize, s.namelen, s.bsize,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    /// No ioctl is supported: ENOTTY, as a local filesystem answers an unknown one, and
    /// quietly (Python's `open` asks one on every file; fuser's default logs each).
    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        refuse_if_ro!(self, reply);
        empty(reply, self.model.setxattr(ino.0, name, value, flags));
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        xattr_reply(reply, self.model.getxattr(ino.0, name), size);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        xattr_reply(reply, self.model.listxattr(ino.0), size);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        refuse_if_ro!(self, reply);
        empty(reply, self.model.removexattr(ino.0, name));
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        refuse_if_ro!(self, reply);
        // Local work only (one index transaction), like mkdir: answered here.
        match self
            .model
            .create(parent.0, name, mode, umask, flags, req.uid(), req.gid())
        {
            Ok((a, fh)) => reply.created(
                &TTL,
                &to_fuse(&a, self.owner),
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(errno(e)),
        }
    }
}

trait OsStrCompat {
    fn from_bytes_compat(b: &[u8]) -> &OsStr;
}

impl OsStrCompat for OsStr {
    fn from_bytes_compat(b: &[u8]) -> &OsStr {
        std::os::unix::ffi::OsStrExt::from_bytes(b)
    }
}
