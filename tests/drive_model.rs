//! The drive's filesystem model without FUSE: random operation sequences against a plain
//! local directory, crash safety, over-quota behaviour, unavailable storage, and that the
//! backend never sees plaintext or names.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use peerstash::drive::backend::DirBackend;
use peerstash::drive::index::ROOT_INO;
use peerstash::drive::model::{DriveOptions, FsError, Model, SetAttr};
use peerstash::DataKey;
use proptest::prelude::*;

const WR: i32 = libc::O_RDWR;

struct Env {
    _tmp: tempfile::TempDir,
    state: PathBuf,
    key: DataKey,
    backend: Arc<DirBackend>,
    /// Where snapshots go, when the drive takes them (every second).
    roots: Option<Arc<MemRoots>>,
}

impl Env {
    fn new(capacity: u64) -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let backend = Arc::new(DirBackend::open(&tmp.path().join("peers"), capacity).unwrap());
        Env {
            state: tmp.path().join("state"),
            key: DataKey::from_bytes([7; 32]),
            backend,
            _tmp: tmp,
            roots: None,
        }
    }

    /// An environment whose drive stores a snapshot every second.
    fn with_snapshots(capacity: u64) -> Env {
        Env {
            roots: Some(Arc::new(MemRoots::default())),
            ..Env::new(capacity)
        }
    }

    fn open(&self) -> Model {
        let opts = DriveOptions {
            fsync_timeout: Duration::from_secs(2),
            sync_on_close: false,
            roots: self
                .roots
                .clone()
                .map(|r| r as Arc<dyn peerstash::drive::RootStore>),
            snapshot_interval: Duration::from_secs(1),
            ..DriveOptions::default()
        };
        Model::new(&self.state, &self.key, self.backend.clone(), opts).unwrap()
    }
}

fn split(m: &Model, path: &str) -> Result<(u64, String), FsError> {
    let p = Path::new(path);
    let parent = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => m.resolve(d)?.ino,
        _ => ROOT_INO,
    };
    Ok((parent, p.file_name().unwrap().to_str().unwrap().to_string()))
}

fn open_path(m: &Model, path: &str, create: bool) -> Result<u64, FsError> {
    let (parent, leaf) = split(m, path)?;
    match m.lookup(parent, OsStr::new(&leaf)) {
        Ok(a) => m.open(a.ino, WR),
        Err(FsError::NotFound) if create => Ok(m
            .create(parent, OsStr::new(&leaf), 0o644, 0o022, WR, 0, 0)?
            .1),
        Err(e) => Err(e),
    }
}

fn write_file(m: &Model, path: &str, data: &[u8]) -> Result<(), FsError> {
    let fh = open_path(m, path, true)?;
    let r = (|| {
        m.setattr(
            m.resolve(Path::new(path))?.ino,
            SetAttr {
                size: Some(0),
                ..Default::default()
            },
        )?;
        for (i, piece) in data.chunks(128 * 1024).enumerate() {
            m.write(fh, (i * 128 * 1024) as u64, piece)?;
        }
        m.flush(fh)
    })();
    m.release(fh)?;
    r
}

/// truncate(2) by path.
fn truncate_path(m: &Model, path: &str, size: u64) {
    let ino = m.resolve(Path::new(path)).unwrap().ino;
    let set = SetAttr {
        size: Some(size),
        ..Default::default()
    };
    m.setattr(ino, set).unwrap();
}

fn read_fh(m: &Model, fh: u64) -> Result<Vec<u8>, FsError> {
    let mut out = Vec::new();
    loop {
        let piece = m.read(fh, out.len() as u64, 200 * 1024)?;
        if piece.is_empty() {
            return Ok(out);
        }
        out.extend_from_slice(&piece);
    }
}

fn read_file(m: &Model, path: &str) -> Result<Vec<u8>, FsError> {
    let a = m.resolve(Path::new(path))?;
    let fh = m.open(a.ino, libc::O_RDONLY)?;
    let r = read_fh(m, fh);
    m.release(fh)?;
    let data = r?;
    assert_eq!(
        data.len() as u64,
        a.size,
        "{path}: size attribute matches content"
    );
    Ok(data)
}

/// Deterministic pseudo-random bytes.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

const NAMES: [&str; 5] = ["a", "b", "d/c", "d/e f", "d/ü"];

#[derive(Debug, Clone)]
enum Op {
    Write {
        f: usize,
        off: u32,
        len: u32,
        seed: u64,
        keep_open: bool,
    },
    Truncate {
        f: usize,
        size: u32,
    },
    Rename {
        a: usize,
        b: usize,
    },
    Unlink {
        f: usize,
    },
    Link {
        a: usize,
        b: usize,
    },
    Close {
        f: usize,
    },
    Read {
        f: usize,
    },
    Sync,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let f = 0..NAMES.len();
    prop_oneof![
        6 => (f.clone(), prop_oneof![0..70_000u32, 0..3_000_000u32], prop_oneof![1..20_000u32, 1..600_000u32], any::<u64>(), any::<bool>())
            .prop_map(|(f, off, len, seed, keep_open)| Op::Write { f, off, len, seed, keep_open }),
        2 => (f.clone(), prop_oneof![0..100_000u32, 0..3_000_000u32]).prop_map(|(f, size)| Op::Truncate { f, size }),
        2 => (f.clone(), f.clone()).prop_map(|(a, b)| Op::Rename { a, b }),
        1 => f.clone().prop_map(|f| Op::Unlink { f }),
        1 => (f.clone(), f.clone()).prop_map(|(a, b)| Op::Link { a, b }),
        2 => f.clone().prop_map(|f| Op::Close { f }),
        2 => f.clone().prop_map(|f| Op::Read { f }),
        1 => Just(Op::Sync),
        1 => Just(Op::Reopen),
    ]
}

struct Harness {
    env: Env,
    model: Option<Model>,
    reference: PathBuf,
    open: HashMap<usize, (File, u64)>,
}

impl Harness {
    /// A drive and a reference directory, each with the directory `d`.
    fn start(env: Env) -> Harness {
        let reference = env._tmp.path().join("reference");
        fs::create_dir_all(reference.join("d")).unwrap();
        let model = env.open();
        model
            .mkdir(ROOT_INO, OsStr::new("d"), 0o755, 0, 0, 0)
            .unwrap();
        Harness {
            env,
            model: Some(model),
            reference,
            open: HashMap::new(),
        }
    }

    fn m(&self) -> &Model {
        self.model.as_ref().unwrap()
    }

    fn close_all(&mut self) {
        for (_, (_, fh)) in self.open.drain() {
            let m = self.model.as_ref().unwrap();
            m.flush(fh).unwrap();
            m.release(fh).unwrap();
        }
    }

    fn apply(&mut self, op: &Op) {
        let r = |i: usize| self.reference.join(NAMES[i]);
        match *op {
            Op::Write {
                f,
                off,
                len,
                seed,
                keep_open,
            } => {
                let data = bytes(seed, len as usize);
                if !self.open.contains_key(&f) {
                    let rf = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(r(f))
                        .unwrap();
                    let fh = open_path(self.m(), NAMES[f], true).unwrap();
                    self.open.insert(f, (rf, fh));
                }
                let (rf, fh) = &self.open[&f];
                rf.write_all_at(&data, off as u64).unwrap();
                assert_eq!(self.m().write(*fh, off as u64, &data).unwrap(), len);
                if !keep_open {
                    let (_, fh) = self.open.remove(&f).unwrap();
                    self.m().flush(fh).unwrap();
                    self.m().release(fh).unwrap();
                }
            }
            Op::Truncate { f, size } => {
                let exists = r(f).exists();
                let got = self.m().resolve(Path::new(NAMES[f]));
                assert_eq!(exists, got.is_ok());
                if exists {
                    let rf = OpenOptions::new().write(true).open(r(f)).unwrap();
                    rf.set_len(size as u64).unwrap();
                    self.m()
                        .setattr(
                            got.unwrap().ino,
                            SetAttr {
                                size: Some(size as u64),
                                ..Default::default()
                            },
                        )
                        .unwrap();
                }
            }
            Op::Rename { a, b } => {
                let want = fs::rename(r(a), r(b)).map_err(|e| e.raw_os_error().unwrap());
                let (pa, la) = split(self.m(), NAMES[a]).unwrap();
                let (pb, lb) = split(self.m(), NAMES[b]).unwrap();
                let got = self
                    .m()
                    .rename(pa, OsStr::new(&la), pb, OsStr::new(&lb), 0)
                    .map_err(|e| e.errno());
                assert_eq!(want, got, "rename {a} {b}");
            }
            Op::Unlink { f } => {
                let want = fs::remove_file(r(f)).map_err(|e| e.raw_os_error().unwrap());
                let (p, l) = split(self.m(), NAMES[f]).unwrap();
                assert_eq!(
                    want,
                    self.m().unlink(p, OsStr::new(&l)).map_err(|e| e.errno())
                );
            }
            Op::Link { a, b } => {
                let want = fs::hard_link(r(a), r(b)).map_err(|e| e.raw_os_error().unwrap());
                let got = (|| {
                    let ino = self.m().resolve(Path::new(NAMES[a]))?.ino;
                    let (p, l) = split(self.m(), NAMES[b])?;
                    self.m().link(ino, p, OsStr::new(&l)).map(|_| ())
                })()
                .map_err(|e| e.errno());
                assert_eq!(want, got, "link {a} {b}");
            }
            Op::Close { f } => {
                if let Some((_, fh)) = self.open.remove(&f) {
                    self.m().flush(fh).unwrap();
                    self.m().release(fh).unwrap();
                }
            }
            Op::Read { f } => {
                let want = fs::read(r(f)).ok();
                let got = read_file(self.m(), NAMES[f]).ok();
                assert!(want == got, "content of {} differs", NAMES[f]);
                // Reading through an open handle sees the unclosed writes too.
                if let Some((rf, fh)) = self.open.get(&f) {
                    let len = rf.metadata().unwrap().len() as usize;
                    let mut want = vec![0; len];
                    rf.read_exact_at(&mut want, 0).unwrap();
                    assert!(read_fh(self.m(), *fh).unwrap() == want);
                }
            }
            Op::Sync => assert!(
                self.m().wait_idle(Duration::from_secs(30)),
                "uploads did not settle"
            ),
            Op::Reopen => {
                self.close_all();
                self.model.take().unwrap().shutdown();
                self.model = Some(self.env.open());
            }
        }
    }

    fn check_all(&self) {
        for (i, name) in NAMES.iter().enumerate() {
            let want = fs::read(self.reference.join(name)).ok();
            let got = read_file(self.m(), name).ok();
            assert!(want == got, "final content of {name} differs");
            if want.is_some() {
                let len = fs::metadata(self.reference.join(name)).unwrap().len();
                let a = self.m().resolve(Path::new(NAMES[i])).unwrap();
                assert_eq!(a.size, len, "size of {name}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, max_shrink_iters: 200, ..ProptestConfig::default() })]
    #[test]
    fn random_ops_match_a_local_directory(ops in prop::collection::vec(op(), 1..28)) {
        random_ops(Env::new(1 << 40), &ops)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, max_shrink_iters: 100, ..ProptestConfig::default() })]
    /// The same with everything that touches the index at once: the uploader, a snapshot
    /// every second, and a `peerstash status` reader polling the index file from another
    /// connection (as `status --wait` does). No operation may fail from lock contention.
    #[test]
    fn random_ops_with_snapshots_and_a_status_reader(ops in prop::collection::vec(op(), 20..80)) {
        let env = Env::with_snapshots(1 << 40);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (state, stop) = (env.state.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    if state.join("index.sqlite").exists() {
                        peerstash::drive::summary_of(&state).expect("status reads the index");
                        reads += 1;
                    }
                }
                reads
            })
        };
        let env = random_ops(env, &ops)?;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let reads = reader.join().expect("the status reader never fails");
        prop_assert!(reads > 0);
        drop(env); // only now: the reader reads its files
    }
}

/// Apply `ops` to a drive and to a local directory, comparing as it goes; then check,
/// settle, restart and check again.
fn random_ops(env: Env, ops: &[Op]) -> Result<Env, TestCaseError> {
    {
        let mut h = Harness::start(env);
        for op in ops {
            h.apply(op);
        }
        h.check_all();
        h.close_all();
        assert!(h.m().wait_idle(Duration::from_secs(30)));
        h.check_all();
        h.model.take().unwrap().shutdown();
        h.model = Some(h.env.open());
        h.check_all();
        // Delete everything: every chunk is released from the backend.
        for name in NAMES {
            let (p, l) = split(h.m(), name).unwrap();
            let _ = h.m().unlink(p, OsStr::new(&l));
        }
        if h.env.roots.is_none() {
            let deadline = Instant::now() + Duration::from_secs(20);
            while h.env.backend.chunk_count() > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            prop_assert_eq!(
                h.env.backend.chunk_count(),
                0,
                "unreferenced chunks are released"
            );
        }
        h.model.take().unwrap().shutdown();
        Ok(h.env)
    }
}

/// FUSE sends a close's RELEASE asynchronously, after its FLUSH. A late release must not
/// seal what another handle is still writing: a crash then would keep a half-written
/// file (seen once in `drive_fuse::kill9_while_writing_leaves_old_or_new` under load).
#[test]
fn a_late_release_does_not_seal_another_handles_unfinished_writes() {
    let env = Env::new(1 << 40);
    let m = env.open();
    let (v1, v2, v3) = (bytes(1, 300_000), bytes(2, 900_000), bytes(3, 900_000));
    write_file(&m, "f", &v1).unwrap();
    // One writer rewrites the file and closes it; its release is still on the way.
    let one = open_path(&m, "f", false).unwrap();
    m.write(one, 0, &v2).unwrap();
    m.flush(one).unwrap();
    // Another is half-way through the next version when that release arrives.
    let two = open_path(&m, "f", false).unwrap();
    m.write(two, 0, &v3[..131_072]).unwrap();
    m.release(one).unwrap();
    drop(m); // crash: the second writer never closes
    let m = env.open();
    let got = read_file(&m, "f").unwrap();
    assert!(
        got == v2,
        "after the crash f must be the last closed version ({} bytes read)",
        got.len()
    );
}

#[test]
fn crash_leaves_old_or_new_content() {
    let env = Env::new(1 << 40);
    let m = env.open();
    let v1: Vec<Vec<u8>> = (0..4)
        .map(|i| bytes(i, 700_000 + i as usize * 1000))
        .collect();
    let v2: Vec<Vec<u8>> = (0..4)
        .map(|i| bytes(100 + i, 3_000_000 + i as usize))
        .collect();
    let names = ["a", "b", "c", "big"];
    for (n, d) in names.iter().zip(&v1) {
        write_file(&m, n, d).unwrap();
    }
    assert!(m.wait_idle(Duration::from_secs(30)));

    // a: new version closed while the storage is down (stays pending).
    // b: new version being written, never closed.
    let fh = open_path(&m, "b", false).unwrap();
    m.write(fh, 0, &v2[1][..1_000_000]).unwrap();
    env.backend.set_unavailable(true);
    write_file(&m, "a", &v2[0]).unwrap();
    // c: untouched. Crash (the model stops without closing anything).
    drop(m);
    env.backend.set_unavailable(false);

    let m = env.open();
    assert_eq!(
        read_file(&m, "a").unwrap(),
        v2[0],
        "closed content survives the crash"
    );
    assert_eq!(
        read_file(&m, "b").unwrap(),
        v1[1],
        "unclosed content reverts to the old version"
    );
    assert_eq!(read_file(&m, "c").unwrap(), v1[2]);
    assert_eq!(m.pending_uploads(), 1, "the upload of a resumes");
    assert!(m.wait_idle(Duration::from_secs(30)));

    // Crash in the middle of uploading a big file, at different moments.
    let mut m = m;
    for round in 0..6u64 {
        let new = bytes(1000 + round, 6_000_000);
        let old = read_file(&m, "big").unwrap();
        write_file(&m, "big", &new).unwrap();
        std::thread::sleep(Duration::from_millis(round * 15));
        drop(m);
        let m2 = env.open();
        let got = read_file(&m2, "big").unwrap();
        assert!(
            got == new || got == old,
            "round {round}: neither old nor new"
        );
        assert!(m2.wait_idle(Duration::from_secs(30)));
        drop(m2);
        m = env.open();
        assert_eq!(read_file(&m, "big").unwrap(), new, "round {round}");
    }
}

#[test]
fn over_quota_is_enospc_and_the_rest_keeps_working() {
    let env = Env::new(5_000_000);
    let m = env.open();
    write_file(&m, "one", &bytes(1, 3_000_000)).unwrap();
    assert!(m.wait_idle(Duration::from_secs(30)));
    // The quota is refreshed after uploads.
    std::thread::sleep(Duration::from_millis(200));
    let err = write_file(&m, "two", &bytes(2, 3_000_000)).unwrap_err();
    assert_eq!(err, FsError::NoSpace);
    assert_eq!(err.errno(), libc::ENOSPC);
    let s = m.statfs().unwrap();
    assert!(s.bfree * 4096 < 2_100_000, "statfs shows the quota: {s:?}");
    // Everything else still works.
    m.mkdir(ROOT_INO, OsStr::new("dir"), 0o755, 0, 0, 0)
        .unwrap();
    write_file(&m, "dir/small", b"small file").unwrap();
    assert_eq!(read_file(&m, "one").unwrap(), bytes(1, 3_000_000));
    assert_eq!(read_file(&m, "dir/small").unwrap(), b"small file");
    // Freeing space makes room again.
    m.unlink(ROOT_INO, OsStr::new("one")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match write_file(&m, "two", &bytes(2, 3_000_000)) {
            Ok(()) => break,
            Err(FsError::NoSpace) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200))
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(m.wait_idle(Duration::from_secs(30)));

    // Over quota discovered only by the backend (quota lowered behind our back): fsync
    // reports ENOSPC, the data stays staged and readable.
    env.backend.set_capacity(3_500_000);
    let fh = open_path(&m, "three", true).unwrap();
    let wrote = m.write(fh, 0, &bytes(3, 1_000_000));
    let synced = wrote.and_then(|_| m.fsync(fh));
    assert_eq!(synced, Err(FsError::NoSpace));
    m.release(fh).unwrap();
    if m.resolve(Path::new("three")).unwrap().size > 0 {
        assert_eq!(read_file(&m, "three").unwrap(), bytes(3, 1_000_000));
    }
}

#[test]
fn unavailable_storage_fsync_eio_then_resumes() {
    let env = Env::new(1 << 40);
    let m = env.open();
    env.backend.set_unavailable(true);
    let fh = open_path(&m, "f", true).unwrap();
    m.write(fh, 0, b"precious").unwrap();
    let t = Instant::now();
    assert!(
        matches!(m.fsync(fh), Err(FsError::NotConfirmed)),
        "fsync fails with EIO"
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    m.release(fh).unwrap();
    assert_eq!(
        read_file(&m, "f").unwrap(),
        b"precious",
        "still staged and readable"
    );
    let s = peerstash::drive::index::summary_of(&env.state).unwrap();
    assert_eq!(
        (s.pending_files, s.pending_bytes),
        (1, 8),
        "status shows the pending upload"
    );
    drop(m);
    env.backend.set_unavailable(false);
    let m = env.open();
    assert!(
        m.wait_idle(Duration::from_secs(60)),
        "upload resumes after restart"
    );
    assert_eq!(read_file(&m, "f").unwrap(), b"precious");
    // Transient put failures are retried.
    env.backend.fail_next_puts(1);
    write_file(&m, "g", b"retried").unwrap();
    assert!(m.wait_idle(Duration::from_secs(60)));
    drop(m);
    // Reading with the staging area gone proves it comes from the backend.
    let m = env.open();
    assert_eq!(read_file(&m, "g").unwrap(), b"retried");
    assert_eq!(fs::read_dir(env.state.join("staging")).unwrap().count(), 0);
}

#[test]
fn backend_sees_no_plaintext_and_no_names() {
    let env = Env::new(1 << 40);
    let m = env.open();
    let marker = b"MARKER-7f3a9c-PLAINTEXT";
    let mut data = Vec::new();
    for _ in 0..50_000 {
        data.extend_from_slice(marker);
    }
    write_file(&m, "secret-name-zq9.txt", &data).unwrap();
    write_file(&m, "dupe-a", &data).unwrap();
    assert!(m.wait_idle(Duration::from_secs(30)));
    let chunks_after_two_copies = env.backend.chunk_count();
    write_file(&m, "dupe-b", &data).unwrap();
    assert!(m.wait_idle(Duration::from_secs(30)));
    assert_eq!(
        env.backend.chunk_count(),
        chunks_after_two_copies,
        "identical content dedupes"
    );
    for entry in walk(env.backend.dir()) {
        let name = entry.file_name().unwrap().to_string_lossy().to_string();
        assert!(!name.contains("secret"), "{name}");
        let bytes = fs::read(&entry).unwrap();
        assert!(
            !bytes.windows(marker.len()).any(|w| w == marker),
            "plaintext in {name}"
        );
        assert!(!bytes.windows(10).any(|w| w == b"secret-nam"));
    }
    // A tampered chunk is detected on read (EIO), not served.
    drop(m);
    let m = env.open();
    for entry in walk(env.backend.dir()) {
        let mut b = fs::read(&entry).unwrap();
        b[40] ^= 1;
        fs::write(&entry, b).unwrap();
    }
    let err = read_file(&m, "dupe-a").unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

#[test]
fn posix_errors_and_metadata() {
    let env = Env::new(1 << 40);
    let m = env.open();
    let root = ROOT_INO;
    let d = m
        .mkdir(root, OsStr::new("d"), 0o750, 0o022, 1000, 1000)
        .unwrap();
    assert_eq!(d.perm, 0o750);
    assert_eq!(
        m.mkdir(root, OsStr::new("d"), 0o755, 0, 0, 0).unwrap_err(),
        FsError::Exists
    );
    let long = "x".repeat(256);
    assert_eq!(
        m.mkdir(root, OsStr::new(&long), 0o755, 0, 0, 0)
            .unwrap_err(),
        FsError::NameTooLong
    );
    assert_eq!(
        m.lookup(root, OsStr::new("nope")).unwrap_err(),
        FsError::NotFound
    );
    write_file(&m, "d/f", b"x").unwrap();
    assert_eq!(
        m.rmdir(root, OsStr::new("d")).unwrap_err(),
        FsError::NotEmpty
    );
    assert_eq!(m.unlink(root, OsStr::new("d")).unwrap_err(), FsError::IsDir);
    assert_eq!(
        m.rmdir(d.ino, OsStr::new("f")).unwrap_err(),
        FsError::NotDir
    );
    assert_eq!(
        m.lookup(m.resolve(Path::new("d/f")).unwrap().ino, OsStr::new("x"))
            .unwrap_err(),
        FsError::NotDir
    );
    // A directory cannot move into itself.
    let sub = m.mkdir(d.ino, OsStr::new("sub"), 0o755, 0, 0, 0).unwrap();
    assert_eq!(
        m.rename(root, OsStr::new("d"), sub.ino, OsStr::new("x"), 0)
            .unwrap_err(),
        FsError::Invalid
    );
    // Directory link counts follow subdirectories.
    assert_eq!(m.getattr(d.ino).unwrap().nlink, 3);
    m.rename(d.ino, OsStr::new("sub"), root, OsStr::new("sub2"), 0)
        .unwrap();
    assert_eq!(m.getattr(d.ino).unwrap().nlink, 2);
    // NOREPLACE and EXCHANGE.
    write_file(&m, "g", b"g").unwrap();
    assert_eq!(
        m.rename(root, OsStr::new("g"), d.ino, OsStr::new("f"), 1)
            .unwrap_err(),
        FsError::Exists
    );
    m.rename(root, OsStr::new("g"), d.ino, OsStr::new("f"), 2)
        .unwrap();
    assert_eq!(read_file(&m, "g").unwrap(), b"x");
    assert_eq!(read_file(&m, "d/f").unwrap(), b"g");
    // Symlinks, hard links, xattrs.
    let s = m
        .symlink(root, OsStr::new("ln"), Path::new("d/f"), 0, 0)
        .unwrap();
    assert_eq!(m.readlink(s.ino).unwrap(), b"d/f");
    let g = m.resolve(Path::new("g")).unwrap();
    m.link(g.ino, d.ino, OsStr::new("g2")).unwrap();
    assert_eq!(m.getattr(g.ino).unwrap().nlink, 2);
    assert_eq!(
        m.link(d.ino, root, OsStr::new("dl")).unwrap_err(),
        FsError::Perm
    );
    m.setxattr(g.ino, OsStr::new("user.k"), b"v", 0).unwrap();
    assert_eq!(
        m.setxattr(g.ino, OsStr::new("user.k"), b"v", 1)
            .unwrap_err(),
        FsError::Exists
    );
    assert_eq!(m.getxattr(g.ino, OsStr::new("user.k")).unwrap(), b"v");
    assert_eq!(m.listxattr(g.ino).unwrap(), b"user.k\0");
    assert_eq!(
        m.getxattr(g.ino, OsStr::new("user.none")).unwrap_err(),
        FsError::NoData
    );
    assert_eq!(
        m.setxattr(g.ino, OsStr::new("trusted.x"), b"v", 0)
            .unwrap_err(),
        FsError::NotSupported
    );
    m.removexattr(g.ino, OsStr::new("user.k")).unwrap();
    // Explicit mtimes stick through close and upload.
    let t = peerstash::drive::index::Ts {
        sec: 1_000_000_000,
        nsec: 123_456_789,
    };
    let fh = open_path(&m, "timed", true).unwrap();
    m.write(fh, 0, b"data").unwrap();
    let set = SetAttr {
        mtime: Some(peerstash::drive::model::TimeSet::At(t)),
        ..Default::default()
    };
    let ino = m.resolve(Path::new("timed")).unwrap().ino;
    m.setattr(ino, set).unwrap();
    m.flush(fh).unwrap();
    m.release(fh).unwrap();
    assert_eq!(m.getattr(ino).unwrap().mtime, t);
    assert!(m.wait_idle(Duration::from_secs(30)));
    drop(m);
    let m = env.open();
    assert_eq!(
        m.getattr(ino).unwrap().mtime,
        t,
        "mtime survives upload and restart"
    );
    assert_eq!(m.getattr(g.ino).unwrap().nlink, 2);
}

/// The server's root store, in memory: the latest root can never be dropped.
#[derive(Debug, Default)]
struct MemRoots {
    roots: std::sync::Mutex<std::collections::BTreeMap<u64, Vec<u8>>>,
}

impl MemRoots {
    fn versions(&self) -> Vec<u64> {
        self.roots.lock().unwrap().keys().rev().copied().collect()
    }
}

impl peerstash::drive::RootStore for MemRoots {
    fn put_root(&self, version: u64, sealed: &[u8]) -> Result<Vec<u64>, RootError> {
        let mut r = self.roots.lock().unwrap();
        if r.keys().next_back().is_some_and(|l| *l >= version) {
            return Err(RootError::Stale);
        }
        r.insert(version, sealed.to_vec());
        Ok(r.keys().rev().copied().collect())
    }
    fn get_root(&self) -> Result<Option<(u64, Vec<u8>)>, RootError> {
        let r = self.roots.lock().unwrap();
        Ok(r.iter().next_back().map(|(v, s)| (*v, s.clone())))
    }
    fn kept_roots(&self) -> Result<Vec<(u64, i64)>, RootError> {
        Ok(self.versions().into_iter().map(|v| (v, 0)).collect())
    }
    fn drop_roots(&self, versions: &[u64]) -> Result<Vec<u64>, RootError> {
        let mut r = self.roots.lock().unwrap();
        let latest = r.keys().next_back().copied();
        assert!(
            !versions.iter().any(|v| Some(*v) == latest),
            "the drive never drops its latest snapshot"
        );
        for v in versions {
            r.remove(v);
        }
        Ok(r.keys().rev().copied().collect())
    }
}

use peerstash::drive::{ChunkBackend, RootError};

/// A deleted file's chunks stay stored while a retained snapshot names them, and are
/// released once that snapshot expires (its root dropped first).
#[test]
fn chunks_of_a_retained_snapshot_stay_and_of_an_expired_one_are_released() {
    let env = Env::new(1 << 30);
    let roots = Arc::new(MemRoots::default());
    let open = |keep: Duration| {
        let opts = DriveOptions {
            fsync_timeout: Duration::from_secs(10),
            sync_on_close: false,
            roots: Some(roots.clone()),
            snapshot_interval: Duration::ZERO,
            snapshot_keep: keep,
            ..DriveOptions::default()
        };
        Model::new(&env.state, &env.key, env.backend.clone(), opts).unwrap()
    };
    let summary = || peerstash::drive::summary_of(&env.state).unwrap();
    let m = open(Duration::from_secs(30 * 86_400));
    let data = bytes(42, 3 << 20);
    write_file(&m, "doomed", &data).unwrap();
    assert!(m.wait_idle(Duration::from_secs(60)));
    let ino = m.resolve(Path::new("doomed")).unwrap().ino;
    let db = rusqlite::Connection::open_with_flags(
        env.state.join("index.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let chunks: Vec<(peerstash::ChunkId, u32)> = db
        .prepare("SELECT chunk, stored FROM file_chunks WHERE ino = ?1")
        .unwrap()
        .query_map([ino as i64], |r| {
            let v: Vec<u8> = r.get(0)?;
            Ok((peerstash::ChunkId(v.try_into().unwrap()), r.get(1)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    drop(db);
    assert!(chunks.len() >= 2, "a few chunks: {}", chunks.len());
    common_wait("a snapshot naming the file", || {
        let s = summary();
        s.snapshot_current && s.snapshot_version > 0
    });
    let first = roots.versions()[0];

    // Deleted: the next snapshot no longer names it, but the first one is retained.
    let (parent, name) = split(&m, "doomed").unwrap();
    m.unlink(parent, OsStr::new(&name)).unwrap();
    common_wait("a snapshot without the file, and the release pass", || {
        let s = summary();
        s.snapshot_current
            && s.snapshot_version > first
            && s.held_chunks >= chunks.len() as u64
            && s.releasable_chunks == 0
    });
    for (id, stored) in &chunks {
        assert!(
            env.backend.get(*id, *stored).is_ok(),
            "a chunk the retained snapshot {first} names was released"
        );
    }
    assert!(roots.versions().contains(&first));
    m.shutdown();

    // snapshot_keep=0: every earlier snapshot expires; their chunks go.
    let m = open(Duration::ZERO);
    common_wait(
        "the earlier snapshot dropped and its chunks released",
        || {
            let s = summary();
            roots.versions().len() == 1 && s.held_chunks == 0 && s.releasable_chunks == 0
        },
    );
    assert!(!roots.versions().contains(&first), "its root is dropped");
    for (id, stored) in &chunks {
        assert!(
            matches!(
                env.backend.get(*id, *stored),
                Err(peerstash::drive::BackendError::NotFound(_))
            ),
            "a chunk only an expired snapshot named is still stored"
        );
    }
    m.shutdown();
    assert_eq!(summary().snapshots_kept, 1, "the latest stays");
}

fn common_wait(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn mount_options_parse() {
    let env = Env::new(1 << 30);
    let mut cfg = peerstash::drive::DriveConfig::new(
        "/mnt",
        &env.state,
        env.key.clone(),
        env.backend.clone(),
    );
    cfg.apply_options("allow_other,max_write=1048576,fsync_timeout=5,nosync_on_close,rw")
        .unwrap();
    assert!(cfg.allow_other);
    assert_eq!(cfg.max_write, Some(1 << 20));
    assert_eq!(cfg.options.fsync_timeout, Duration::from_secs(5));
    assert!(!cfg.options.sync_on_close);
    assert!(cfg.apply_options("max_write=lots").is_err());
    assert!(cfg.apply_options("bogus").unwrap_err().contains("bogus"));
    assert_eq!(
        cfg.options.snapshot_keep,
        Duration::from_secs(30 * 86_400),
        "earlier snapshots are kept 30 days by default"
    );
    cfg.apply_options("snapshot_interval=10,snapshot_keep=12h")
        .unwrap();
    assert_eq!(cfg.options.snapshot_keep, Duration::from_secs(12 * 3600));
    assert_eq!(cfg.options.snapshot_interval, Duration::from_secs(10));
    let err = cfg.apply_options("snapshot_keep=forever").unwrap_err();
    assert!(err.contains("snapshot_keep"), "{err}");
}

#[test]
fn another_data_key_is_refused() {
    let env = Env::new(1 << 30);
    drop(env.open());
    let other = DataKey::from_bytes([8; 32]);
    let err = Model::new(
        &env.state,
        &other,
        env.backend.clone(),
        DriveOptions::default(),
    )
    .err();
    assert_eq!(err, Some(FsError::WrongKey));
}

/// rsync-style update (a new temporary file renamed over the old one) of a file with a
/// small change: only the chunks around the change are uploaded.
#[test]
fn small_change_uploads_only_changed_chunks() {
    let env = Env::new(1 << 40);
    let m = env.open();
    let mut data = bytes(42, 16 << 20);
    write_file(&m, "big", &data).unwrap();
    assert!(m.wait_idle(Duration::from_secs(60)));
    let first = env.backend.bytes_put();
    assert!(first >= 16 << 20);
    for b in &mut data[8 << 20..(8 << 20) + 1000] {
        *b ^= 0x5a;
    }
    write_file(&m, ".big.tmp", &data).unwrap();
    m.rename(
        ROOT_INO,
        OsStr::new(".big.tmp"),
        ROOT_INO,
        OsStr::new("big"),
        0,
    )
    .unwrap();
    assert!(m.wait_idle(Duration::from_secs(60)));
    let second = env.backend.bytes_put() - first;
    eprintln!("16 MiB file, 1000 bytes changed: {second} bytes uploaded");
    assert!(
        second < 6 << 20,
        "uploaded {second} bytes for a 1000-byte change"
    );
    assert_eq!(read_file(&m, "big").unwrap(), data);
}

/// Found by `random_ops`: a file replaced by a rename while still open, with its earlier
/// version still waiting for upload. The unlinked inode's stage must not stay pending
/// for ever (the uploader spun on it and `wait_idle` never returned); its content goes
/// at the last close.
#[test]
fn a_file_replaced_while_open_and_pending_does_not_block_uploads() {
    let sequences = [
        vec![
            Op::Write {
                f: 0,
                off: 0,
                len: 2,
                seed: 1,
                keep_open: false,
            },
            Op::Rename { a: 0, b: 2 },
            Op::Write {
                f: 2,
                off: 29_946,
                len: 581_369,
                seed: 2,
                keep_open: true,
            },
            Op::Write {
                f: 1,
                off: 2_598_194,
                len: 359_324,
                seed: 3,
                keep_open: false,
            },
            Op::Rename { a: 1, b: 2 },
            Op::Sync,
            Op::Close { f: 2 },
            Op::Sync,
        ],
        vec![
            Op::Write {
                f: 0,
                off: 0,
                len: 5000,
                seed: 1,
                keep_open: false,
            },
            Op::Write {
                f: 0,
                off: 10,
                len: 5000,
                seed: 2,
                keep_open: true,
            },
            Op::Unlink { f: 0 },
            Op::Sync,
            Op::Close { f: 0 },
            Op::Reopen,
            Op::Sync,
        ],
    ];
    // The race needs the uploader to lag: repeat to give it chances.
    for _ in 0..5 {
        for seq in &sequences {
            let env = Env::new(1 << 40);
            let mut h = Harness::start(env);
            for op in seq {
                h.apply(op);
            }
            h.check_all();
        }
    }
}

/// Another connection to the index may hold its write lock for a moment (a `peerstash
/// status` reader does, briefly, when it finds the WAL header mid-update and recovers it).
/// Every operation that writes the index must wait for that lock, never fail with EIO: a
/// transaction that reads first and upgrades to a write later gets SQLITE_BUSY at once,
/// without waiting (seen as random `rename` EIO under rsync).
#[test]
fn index_writers_wait_for_a_lock_held_by_another_connection() {
    let env = Env::new(1 << 30);
    let m = env.open();
    let dir = m
        .mkdir(ROOT_INO, OsStr::new("dir"), 0o755, 0, 0, 0)
        .unwrap();
    for name in ["a", "b", "c", "d"] {
        write_file(&m, name, &bytes(name.len() as u64, 5000)).unwrap();
    }
    assert!(m.wait_idle(Duration::from_secs(30)));
    let hold = |ms: u64| {
        let path = env.state.join("index.sqlite");
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let c = rusqlite::Connection::open(path).unwrap();
            c.execute_batch("BEGIN IMMEDIATE").unwrap();
            tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(ms));
            c.execute_batch("COMMIT").unwrap();
        });
        rx.recv().unwrap();
        t
    };
    let root = |n: &str| OsStr::new(n).to_owned();
    type Step<'a> = (&'a str, Box<dyn Fn(&Model) -> Result<(), FsError> + 'a>);
    let steps: Vec<Step> = vec![
        (
            "rename over",
            Box::new(|m| m.rename(ROOT_INO, &root("a"), ROOT_INO, &root("b"), 0)),
        ),
        (
            "rename",
            Box::new(|m| m.rename(ROOT_INO, &root("b"), dir.ino, &root("b"), 0)),
        ),
        ("unlink", Box::new(|m| m.unlink(ROOT_INO, &root("c")))),
        (
            "mkdir",
            Box::new(|m| m.mkdir(ROOT_INO, &root("e"), 0o755, 0, 0, 0).map(|_| ())),
        ),
        ("rmdir", Box::new(|m| m.rmdir(ROOT_INO, &root("e")))),
        (
            "link",
            Box::new(|m| {
                let d = m.resolve(Path::new("d"))?;
                m.link(d.ino, ROOT_INO, &root("d2")).map(|_| ())
            }),
        ),
        (
            "symlink",
            Box::new(|m| {
                m.symlink(ROOT_INO, &root("s"), Path::new("d"), 0, 0)
                    .map(|_| ())
            }),
        ),
        (
            "chmod",
            Box::new(|m| {
                let d = m.resolve(Path::new("d"))?;
                m.setattr(
                    d.ino,
                    SetAttr {
                        mode: Some(0o600),
                        ..Default::default()
                    },
                )
                .map(|_| ())
            }),
        ),
        (
            "truncate",
            Box::new(|m| {
                let d = m.resolve(Path::new("d"))?;
                m.setattr(
                    d.ino,
                    SetAttr {
                        size: Some(10),
                        ..Default::default()
                    },
                )
                .map(|_| ())
            }),
        ),
        (
            "setxattr",
            Box::new(|m| {
                let d = m.resolve(Path::new("d"))?;
                m.setxattr(d.ino, &root("user.k"), b"v", 0)
            }),
        ),
        (
            "write and close",
            Box::new(|m| write_file(m, "f", &bytes(9, 70_000))),
        ),
    ];
    for (what, step) in &steps {
        let t = hold(300);
        let res = step(&m);
        t.join().unwrap();
        assert_eq!(
            res,
            Ok(()),
            "{what} while another connection held the write lock"
        );
    }
    assert!(m.wait_idle(Duration::from_secs(30)));
    assert_eq!(read_file(&m, "dir/b").unwrap(), bytes(1, 5000));
    assert_eq!(read_file(&m, "f").unwrap(), bytes(9, 70_000));
    m.shutdown();
}

/// A drive that snapshots as soon as uploads settle (into the returned root store), with
/// no upload at close: for the tests of giving space back near the quota.
fn snapshotting_drive(env: &Env) -> (Model, Arc<MemRoots>) {
    let roots = Arc::new(MemRoots::default());
    let opts = DriveOptions {
        fsync_timeout: Duration::from_secs(30),
        sync_on_close: false,
        roots: Some(roots.clone()),
        snapshot_interval: Duration::ZERO,
        ..DriveOptions::default()
    };
    let m = Model::new(&env.state, &env.key, env.backend.clone(), opts).unwrap();
    (m, roots)
}

/// Near the quota, a delete gives its space back: a new file as large as the deleted one
/// fits, at write time and at upload, although a retained snapshot named the deleted file
/// (the drive stores a snapshot covering the delete, thins the earlier one and releases).
/// Before, the write failed with ENOSPC and the drive stayed wedged: the release waited for
/// a snapshot, and the snapshot for the space the release would free.
#[test]
fn deleting_near_the_quota_gives_the_space_back() {
    let env = Env::new(2_500_000);
    let (m, roots) = snapshotting_drive(&env);
    let (first, second) = (bytes(1, 1_400_000), bytes(2, 1_400_000));
    write_file(&m, "first", &first).unwrap();
    assert!(m.wait_idle(Duration::from_secs(30)));
    common_wait("a snapshot naming the first file", || {
        let s = peerstash::drive::summary_of(&env.state).unwrap();
        s.snapshot_current && s.chunks > 0
    });
    // Retained (younger than an hour), it holds the first file's chunks after the delete.
    let named_first = roots.versions()[0];
    m.unlink(ROOT_INO, OsStr::new("first")).unwrap();
    write_file(&m, "second", &second).expect("the deleted file's space is writable again");
    let fh = open_path(&m, "second", false).unwrap();
    assert_eq!(m.fsync(fh), Ok(()), "the second file is stored");
    m.release(fh).unwrap();
    assert_eq!(read_file(&m, "second").unwrap(), second);
    assert!(
        !roots.versions().contains(&named_first),
        "the snapshot naming the deleted file was thinned to make room: {:?}",
        roots.versions()
    );
    // Both files went to the backend, which never held both at once.
    assert!(env.backend.bytes_put() > 2_800_000);
    m.shutdown();
    // After a restart the drive still reads the file back.
    let m = env.open();
    assert_eq!(read_file(&m, "second").unwrap(), second);
}

/// One reclaim thins as many retained snapshots as the new data needs. Each thinning
/// changes the index, so a snapshot covering it is stored before the release; before, those
/// snapshots counted against a budget of three meant for an index changing under writes,
/// the reclaim gave up after the third thinning, and the upload failed with ENOSPC with the
/// deleted files' space still held (first seen as a flaky run of the test above).
#[test]
fn one_reclaim_thins_as_many_snapshots_as_it_needs() {
    let env = Env::new(10_000_000);
    let (m, _roots) = snapshotting_drive(&env);
    // Five files of 300 kB, each named by its own retained snapshot, then deleted: 1.5 MB
    // held only for earlier snapshots.
    for i in 0..5u8 {
        let name = format!("old{i}");
        write_file(&m, &name, &bytes(10 + i as u64, 300_000)).unwrap();
        assert!(m.wait_idle(Duration::from_secs(30)));
        common_wait("a snapshot naming the file", || {
            let s = peerstash::drive::summary_of(&env.state).unwrap();
            s.snapshot_current && s.chunks > 0
        });
        m.unlink(ROOT_INO, OsStr::new(&name)).unwrap();
    }
    // Written under a large quota, so nothing is given back while it is written; then the
    // quota shrinks and 2.15 MB more fits only once four of the five are given back, all
    // in the reclaim that follows the refused upload.
    let big = bytes(3, 2_150_000);
    let fh = open_path(&m, "big", true).unwrap();
    for (i, piece) in big.chunks(128 * 1024).enumerate() {
        m.write(fh, (i * 128 * 1024) as u64, piece).unwrap();
    }
    env.backend.set_capacity(2_500_000);
    assert_eq!(m.fsync(fh), Ok(()), "the new file is stored");
    m.release(fh).unwrap();
    assert_eq!(read_file(&m, "big").unwrap(), big);
    m.shutdown();
}

/// A size past the largest file (pjdfstest's truncate/12: 999,999,999,999,999 bytes) is
/// EFBIG, as on a local filesystem, for truncate and for a write; not ENOSPC.
#[test]
fn sizes_past_the_largest_file_are_efbig() {
    let env = Env::new(1 << 30);
    let m = env.open();
    write_file(&m, "f", b"hello").unwrap();
    let a = m.resolve(Path::new("f")).unwrap();
    let huge = SetAttr {
        size: Some(999_999_999_999_999),
        ..Default::default()
    };
    assert_eq!(m.setattr(a.ino, huge).unwrap_err().errno(), libc::EFBIG);
    let fh = open_path(&m, "f", false).unwrap();
    assert_eq!(
        m.write(fh, 999_999_999_999_999, b"x").unwrap_err().errno(),
        libc::EFBIG
    );
    m.release(fh).unwrap();
    assert_eq!(read_file(&m, "f").unwrap(), b"hello");
}

/// What `peerstash status --wait` reads to know why uploads are held up, so that it ends
/// with the reason instead of waiting for ever: `unavailable` while the storage is down,
/// `over_quota` once uploads are refused with nothing left to give back, `ok` when they
/// go through, and nothing once the drive has stopped.
#[test]
fn the_uploader_publishes_why_uploads_are_held_up() {
    use peerstash::drive::health::{self, UploadState};
    let env = Env::new(1 << 30);
    let m = env.open();
    let state = |want: UploadState| {
        common_wait(&format!("health {want:?}"), || {
            health::read(&env.state).is_some_and(|h| h.state == want)
        })
    };
    state(UploadState::Ok);
    env.backend.set_unavailable(true);
    write_file(&m, "a", &bytes(1, 50_000)).unwrap();
    state(UploadState::Unavailable);
    assert!(health::read(&env.state)
        .unwrap()
        .detail
        .contains("unavailable"));
    // The quota shrinks below what is staged (another device used it up).
    env.backend.set_capacity(10_000);
    env.backend.set_unavailable(false);
    state(UploadState::OverQuota);
    assert!(health::read(&env.state).unwrap().detail.contains("quota"));
    env.backend.set_capacity(1 << 30);
    state(UploadState::Ok);
    assert!(m.wait_idle(Duration::from_secs(30)));
    m.shutdown();
    assert_eq!(
        health::read(&env.state),
        None,
        "a stopped drive publishes nothing"
    );
}

/// The heartbeat that tells `status --wait` a drive is mounted goes on while one upload
/// round takes long (a large file on a slow network): it used to beat only between
/// rounds, and `status --wait` then said the drive was not mounted while it uploaded.
#[test]
fn the_heartbeat_goes_on_through_a_long_upload_round() {
    use peerstash::drive::health;
    let env = Env::new(1 << 30);
    let m = env.open();
    env.backend.hold_puts(true);
    write_file(&m, "big", &bytes(2, 300_000)).unwrap();
    common_wait("a put under way", || env.backend.puts_held() > 0);
    let before = health::read(&env.state)
        .expect("a mounted drive's health")
        .updated;
    // A beat is due every HEARTBEAT; the wait is far longer, so only a missing beat fails.
    common_wait("a heartbeat during the round", || {
        health::read(&env.state).is_some_and(|h| h.updated > before)
    });
    env.backend.hold_puts(false);
    assert!(m.wait_idle(Duration::from_secs(30)));
    assert_eq!(read_file(&m, "big").unwrap(), bytes(2, 300_000));
    m.shutdown();
}

/// A sequential read whose read-ahead window holds a corrupt chunk: the reads that need
/// that chunk fail as corrupt (EIO at the FUSE edge) at once, every other read — before
/// and after it, fetched in the same windows — returns the right bytes, and no read
/// waits for ever on a fetch that failed in the background.
#[test]
fn a_corrupt_chunk_inside_a_read_ahead_window_fails_only_its_own_reads() {
    let env = Env::new(1 << 40);
    let data = bytes(77, 24 << 20);
    {
        let m = env.open();
        write_file(&m, "big", &data).unwrap();
        assert!(m.wait_idle(Duration::from_secs(60)));
    }
    // Flip one byte of one stored chunk (all of them are this file's), not the first.
    let mut stored: Vec<PathBuf> = fs::read_dir(env.backend.dir())
        .unwrap()
        .flat_map(|d| fs::read_dir(d.unwrap().path()).unwrap())
        .map(|f| f.unwrap().path())
        .collect();
    stored.sort();
    assert!(stored.len() >= 6, "24 MiB should make several chunks");
    let victim = &stored[stored.len() / 2];
    let mut b = fs::read(victim).unwrap();
    b[100] ^= 1;
    fs::write(victim, b).unwrap();

    // A fresh mount: nothing cached, every chunk comes through the read-ahead.
    let m = env.open();
    let ino = m.resolve(Path::new("big")).unwrap().ino;
    let fh = m.open(ino, libc::O_RDONLY).unwrap();
    let piece = 128 << 10;
    let mut failed = Vec::new();
    let mut off = 0usize;
    while off < data.len() {
        match m.read(fh, off as u64, piece as u32) {
            Ok(got) => assert!(
                got == data[off..(off + piece).min(data.len())],
                "bytes at {off} differ"
            ),
            Err(FsError::Backend(peerstash::drive::backend::BackendError::Corrupt(_))) => {
                failed.push(off)
            }
            Err(e) => panic!("read at {off}: {e}"),
        }
        off += piece;
    }
    m.release(fh).unwrap();
    assert!(
        !failed.is_empty(),
        "the corrupt chunk was read without error"
    );
    // Only the reads touching that one chunk (at most 4 MiB) failed, and they are
    // contiguous.
    let span = failed.last().unwrap() - failed.first().unwrap() + piece;
    assert!(span <= (4 << 20) + 2 * piece, "failed over {span} bytes");
    assert_eq!(
        span / piece,
        failed.len(),
        "failed reads are not contiguous"
    );
}

/// Files closed at up to 64 KiB are sealed into the index rather than a synced staging
/// file. Closed while the storage is down, such files read back; rewritten, grown past
/// the limit and truncated while pending, each keeps its last closed content through a
/// crash; once uploaded they read back from the peers and leave nothing behind locally.
#[test]
fn small_files_pending_through_a_crash_read_back_and_leave_nothing_behind() {
    let env = Env::new(1 << 40);
    let m = env.open();
    env.backend.set_unavailable(true);
    let mut want: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| (format!("s{i}"), bytes(200 + i, i as usize * 3_000)))
        .collect();
    for (name, data) in &want {
        write_file(&m, name, data).unwrap();
    }
    // Rewritten while pending; grown from 57 KB to 97 KB (a staging file from then on);
    // truncated to 10 bytes by path (no close follows).
    want[0].1 = b"second version".to_vec();
    write_file(&m, "s0", &want[0].1).unwrap();
    let more = bytes(300, 40_000);
    let fh = open_path(&m, "s19", false).unwrap();
    m.write(fh, want[19].1.len() as u64, &more).unwrap();
    m.flush(fh).unwrap();
    m.release(fh).unwrap();
    want[19].1.extend_from_slice(&more);
    truncate_path(&m, "s18", 10);
    want[18].1.truncate(10);
    for (name, data) in &want {
        assert_eq!(
            &read_file(&m, name).unwrap(),
            data,
            "{name} before the crash"
        );
    }
    assert_eq!(m.pending_uploads(), 20, "every file waits for the storage");
    drop(m); // crash: nothing uploaded

    env.backend.set_unavailable(false);
    let m = env.open();
    for (name, data) in &want {
        assert_eq!(
            &read_file(&m, name).unwrap(),
            data,
            "{name} after the crash"
        );
    }
    assert!(m.wait_idle(Duration::from_secs(30)));
    m.shutdown();
    let staged: Vec<_> = fs::read_dir(env.state.join("staging")).unwrap().collect();
    assert!(staged.is_empty(), "staging files left: {staged:?}");
    let db = rusqlite::Connection::open(env.state.join("index.sqlite")).unwrap();
    let kept: i64 = db
        .query_row("SELECT COUNT(*) FROM stage_data", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        kept, 0,
        "small files' content still kept in the index after upload"
    );
    drop(db);
    let m = env.open();
    for (name, data) in &want {
        assert_eq!(&read_file(&m, name).unwrap(), data, "{name} from the peers");
    }
}

/// The distinct chunks the drive's index names (committed file versions).
fn chunks_named(env: &Env) -> i64 {
    let db = rusqlite::Connection::open(env.state.join("index.sqlite")).unwrap();
    db.query_row("SELECT COUNT(DISTINCT chunk) FROM file_chunks", [], |r| {
        r.get(0)
    })
    .unwrap()
}

/// Small files go up packed: many files, one chunk (one placement, one stored file per
/// holder). Deleting most of a pack's files packs the rest anew and gives the pack's
/// space back; every file reads back throughout and after a restart.
#[test]
fn small_files_share_packs_and_deleting_them_gives_the_space_back() {
    let env = Env::new(1 << 40);
    let m = env.open();
    let files: Vec<(String, Vec<u8>)> = (0..60)
        .map(|i| (format!("p{i}"), bytes(500 + i, 1_000 + i as usize * 97)))
        .collect();
    for (name, data) in &files {
        write_file(&m, name, data).unwrap();
    }
    // Two files with the same content share one piece.
    write_file(&m, "twin", &files[7].1).unwrap();
    assert!(m.wait_idle(Duration::from_secs(30)));
    let total: usize = files.iter().map(|(_, d)| d.len()).sum();
    assert!(
        env.backend.chunk_count() <= 2,
        "61 small files ({total} bytes) in {} chunks",
        env.backend.chunk_count()
    );
    let used = env.backend.quota().unwrap().used_bytes;
    assert!(
        used < total as u64 + 1_000,
        "the twin was stored twice: {used} bytes for {total}"
    );
    for (name, data) in &files {
        assert_eq!(&read_file(&m, name).unwrap(), data, "{name}");
    }
    // Delete all but the last five (and the twin): under half of the pack stays alive.
    for (name, _) in &files[..55] {
        m.unlink(ROOT_INO, OsStr::new(name)).unwrap();
    }
    let live: usize = files[55..].iter().map(|(_, d)| d.len()).sum::<usize>() + files[7].1.len();
    common_wait("the pack's space to come back", || {
        env.backend.quota().unwrap().used_bytes < (live as u64 + 28) * 2
    });
    assert!(m.wait_idle(Duration::from_secs(30)));
    assert_eq!(read_file(&m, "twin").unwrap(), files[7].1);
    for (name, data) in &files[55..] {
        assert_eq!(
            &read_file(&m, name).unwrap(),
            data,
            "{name} after the repack"
        );
    }
    m.shutdown();
    let m = env.open();
    for (name, data) in &files[55..] {
        assert_eq!(
            &read_file(&m, name).unwrap(),
            data,
            "{name} after a restart"
        );
    }
    assert!(matches!(read_file(&m, "p3"), Err(FsError::NotFound)));
}

/// A crash after one pack of a round was stored and before the round was committed
/// loses nothing: every file reads back after the restart, goes up again, and the
/// orphaned pack is released (the storage ends up holding what the index names).
#[test]
fn a_crash_mid_pack_loses_nothing_and_leaks_nothing() {
    let env = Env::new(1 << 40);
    let opts = DriveOptions {
        fsync_timeout: Duration::from_secs(2),
        sync_on_close: false,
        put_batch_bytes: 1, // one put per pack
        ..DriveOptions::default()
    };
    let m = Model::new(&env.state, &env.key, env.backend.clone(), opts).unwrap();
    // All closed before the storage comes back: one round of several packs, of which
    // the first goes through and every later put fails.
    env.backend.set_unavailable(true);
    let files: Vec<(String, Vec<u8>)> = (0..300)
        .map(|i| (format!("c{i}"), bytes(900 + i, 12_000)))
        .collect();
    for (name, data) in &files {
        write_file(&m, name, data).unwrap();
    }
    env.backend.fail_puts_after(1, u32::MAX);
    env.backend.set_unavailable(false);
    common_wait("the first pack stored", || env.backend.chunk_count() >= 1);
    assert_eq!(m.pending_uploads(), 300, "nothing committed");
    drop(m); // crash

    env.backend.fail_next_puts(0);
    let m = env.open();
    for (name, data) in &files {
        assert_eq!(
            &read_file(&m, name).unwrap(),
            data,
            "{name} after the crash"
        );
    }
    assert!(m.wait_idle(Duration::from_secs(30)));
    common_wait("only the named chunks stored", || {
        env.backend.chunk_count() as i64 == chunks_named(&env)
    });
    m.shutdown();
    let m = env.open();
    for (name, data) in &files {
        assert_eq!(&read_file(&m, name).unwrap(), data, "{name} from storage");
    }
}

/// `cp -a` sets a copied file's times and permission bits while it still holds it open:
/// they show at once, reach the index with the close, survive a restart, and an empty
/// file opened with O_TRUNC keeps the times set on it though nothing was written.
#[test]
fn times_and_modes_set_while_writing_show_at_once_and_stick() {
    use peerstash::drive::index::Ts;
    use peerstash::drive::model::TimeSet;
    let env = Env::new(1 << 40);
    let m = env.open();
    let (t1, t2) = (
        Ts {
            sec: 1_500_000_000,
            nsec: 7,
        },
        Ts {
            sec: 1_400_000_000,
            nsec: 9,
        },
    );
    let set = |mode: u32, at: Ts| SetAttr {
        mode: Some(mode),
        atime: Some(TimeSet::At(at)),
        mtime: Some(TimeSet::At(at)),
        ..Default::default()
    };
    let fh = open_path(&m, "copied", true).unwrap();
    m.write(fh, 0, b"some content").unwrap();
    let ino = m.resolve(Path::new("copied")).unwrap().ino;
    let a = m.setattr(ino, set(0o640, t1)).unwrap();
    assert_eq!((a.perm, a.mtime, a.atime), (0o640, t1, t1));
    let seen = m.getattr(ino).unwrap();
    assert_eq!((seen.perm, seen.mtime, seen.atime), (0o640, t1, t1));
    m.flush(fh).unwrap();
    m.release(fh).unwrap();
    // An empty file truncated on open, its times set, closed without a write.
    write_file(&m, "empty", b"").unwrap();
    let e = m.resolve(Path::new("empty")).unwrap().ino;
    let fh = m.open(e, libc::O_WRONLY | libc::O_TRUNC).unwrap();
    m.setattr(e, set(0o600, t2)).unwrap();
    m.flush(fh).unwrap();
    m.release(fh).unwrap();
    assert!(m.wait_idle(Duration::from_secs(30)));
    m.shutdown();
    let m = env.open();
    let a = m.getattr(ino).unwrap();
    assert_eq!(
        (a.perm, a.mtime, a.atime),
        (0o640, t1, t1),
        "after a restart"
    );
    assert_eq!(read_file(&m, "copied").unwrap(), b"some content");
    let a = m.getattr(e).unwrap();
    assert_eq!(
        (a.perm, a.mtime, a.atime),
        (0o600, t2, t2),
        "the empty file's"
    );
}

/// A file being written stays in memory while small and moves to a staging file once it
/// grows past 64 KiB: what was written before the move (holes included) is kept, reads
/// before the close see every write, and a truncate back down and regrowth read right.
#[test]
fn a_small_file_moves_to_disk_as_it_grows_and_loses_nothing() {
    let env = Env::new(1 << 40);
    let m = env.open();
    let staged = || fs::read_dir(env.state.join("staging")).unwrap().count();
    let fh = open_path(&m, "growing", true).unwrap();
    let (a, b) = (bytes(41, 40_000), bytes(42, 20_000));
    m.write(fh, 0, &a).unwrap();
    assert_eq!(staged(), 0, "a 40 KB file being written is kept in memory");
    m.write(fh, 60_000, &b).unwrap();
    assert_eq!(staged(), 1, "past 64 KiB it has a staging file");
    let mut want = a.clone();
    want.resize(60_000, 0);
    want.extend_from_slice(&b);
    assert_eq!(read_fh(&m, fh).unwrap(), want, "before the close");
    m.flush(fh).unwrap();
    m.release(fh).unwrap();
    assert_eq!(read_file(&m, "growing").unwrap(), want, "after the close");
    // Rewritten: truncated to 10 bytes, then grown again with a hole.
    let fh = open_path(&m, "growing", false).unwrap();
    truncate_path(&m, "growing", 10);
    m.write(fh, 100, b"tail").unwrap();
    want.truncate(10);
    want.resize(100, 0);
    want.extend_from_slice(b"tail");
    assert_eq!(read_fh(&m, fh).unwrap(), want);
    m.flush(fh).unwrap();
    m.release(fh).unwrap();
    assert!(m.wait_idle(Duration::from_secs(30)));
    m.shutdown();
    let m = env.open();
    assert_eq!(read_file(&m, "growing").unwrap(), want, "after a restart");
}
