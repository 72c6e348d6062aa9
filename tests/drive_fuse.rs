//! The drive through a real FUSE mount (backend: a local directory). Every mount runs in a
//! child process — this test binary re-executed with `PEERSTASH_TEST_MOUNT` set, which
//! makes `child_mount` serve the mount — so a test can kill it with SIGKILL, and a hung
//! mount never hangs the test runner. Guards stop the child and lazily unmount on drop.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, FileTimes};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use common::{bytes, Proc};
use peerstash::drive::{run_foreground_until, DirBackend, DriveConfig};
use peerstash::DataKey;

const MARKER: &[u8] = b"PEERSTASH-PLAINTEXT-MARKER-51c0ffee";

/// Serves a mount when re-executed by a test; a no-op otherwise.
#[test]
fn child_mount() {
    let Ok(mnt) = std::env::var("PEERSTASH_TEST_MOUNT") else {
        return;
    };
    let state = std::env::var("PEERSTASH_TEST_STATE").unwrap();
    let backend_dir = std::env::var("PEERSTASH_TEST_BACKEND").unwrap();
    let stop = PathBuf::from(std::env::var("PEERSTASH_TEST_STOP").unwrap());
    let capacity = std::env::var("PEERSTASH_TEST_CAPACITY").map_or(1 << 40, |c| c.parse().unwrap());
    let backend = Arc::new(DirBackend::open(Path::new(&backend_dir), capacity).unwrap());
    if let Ok(ms) = std::env::var("PEERSTASH_TEST_GET_DELAY_MS") {
        backend.set_get_delay(Duration::from_millis(ms.parse().unwrap()));
    }
    let mut cfg = DriveConfig::new(mnt, state, DataKey::from_bytes([9; 32]), backend);
    cfg.options.fsync_timeout = Duration::from_secs(30);
    // Knobs for measuring kernel settings by hand (see the report in the drive docs).
    if let Ok(w) = std::env::var("PEERSTASH_TEST_MAX_WRITE") {
        cfg.max_write = Some(w.parse().unwrap());
    }
    cfg.writeback_cache = std::env::var("PEERSTASH_TEST_WRITEBACK").is_ok();
    if let Ok(o) = std::env::var("PEERSTASH_TEST_OPTIONS") {
        cfg.apply_options(&o).unwrap();
    }
    if std::env::var("PEERSTASH_TEST_NO_SYNC_ON_CLOSE").is_ok() {
        cfg.options.sync_on_close = false;
    }
    if let Ok(pidfile) = std::env::var("PEERSTASH_TEST_SIGNALS") {
        // run_foreground as the CLI runs it: in a process whose only thread blocks the
        // signals. fork() leaves just this thread in the child (libtest's other threads
        // are idle), which then serves until SIGTERM.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // Die with the test process that forked us, so a failing test leaves nothing.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
            let code = match peerstash::drive::run_foreground(cfg) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("run_foreground: {e}");
                    1
                }
            };
            unsafe { libc::_exit(code) };
        }
        fs::write(&pidfile, pid.to_string()).unwrap();
        let mut status = 0;
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "status {status}"
        );
        return;
    }
    // The stop file stands in for SIGTERM: libtest's main thread would take the signal.
    run_foreground_until(cfg, move || stop.exists()).unwrap();
}

fn is_mounted(mnt: &Path) -> bool {
    let want = mnt.to_str().unwrap();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want))
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for_quietly(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// A mount served by a child process.
struct Mount {
    proc: Option<Proc>,
    mnt: PathBuf,
    stop: PathBuf,
}

impl Mount {
    fn start(base: &Path) -> Mount {
        Mount::start_with(base, &[])
    }

    fn start_with(base: &Path, env: &[(&str, &str)]) -> Mount {
        let mnt = base.join("mnt");
        fs::create_dir_all(&mnt).unwrap();
        let stop = base.join("stop");
        let _ = fs::remove_file(&stop);
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["child_mount", "--exact", "--nocapture", "--test-threads=1"])
            .env("PEERSTASH_TEST_MOUNT", &mnt)
            .env("PEERSTASH_TEST_STATE", base.join("state"))
            .env("PEERSTASH_TEST_BACKEND", base.join("peers"))
            .env("PEERSTASH_TEST_STOP", &stop)
            .envs(env.iter().copied())
            .stdout(Stdio::null());
        let proc = Proc::spawn("mount", cmd);
        let m = Mount {
            proc: Some(proc),
            mnt,
            stop,
        };
        // Mounted, and not a dead mount left by a killed process.
        wait_for("the mount", Duration::from_secs(30), || {
            is_mounted(&m.mnt) && fs::metadata(&m.mnt).is_ok()
        });
        m
    }

    /// Clean unmount: ask the child to stop and wait for it.
    fn stop(mut self) {
        fs::write(&self.stop, b"").unwrap();
        let mut p = self.proc.take().unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = p.child.try_wait().unwrap() {
                assert!(status.success(), "mount process failed: {status}");
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "mount did not stop"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!is_mounted(&self.mnt));
    }

    /// SIGKILL the mount process; the kernel connection dies with it. fusermount3's
    /// auto-unmount removes the mount unless files in it are still open; whatever is left
    /// is a dead mount that the next mount clears.
    fn kill9(mut self) {
        let mut p = self.proc.take().unwrap();
        p.kill9();
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = fs::write(&self.stop, b"");
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = p.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            p.kill9();
        }
        if is_mounted(&self.mnt) {
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(&self.mnt)
                .status();
        }
    }
}

fn run(cmd: &mut Command) -> String {
    // `timeout` bounds every external command, so a hung mount cannot hang the suite.
    let mut full = Command::new("timeout");
    full.arg("300").arg(cmd.get_program()).args(cmd.get_args());
    let out = full.output().unwrap();
    assert!(
        out.status.success(),
        "{:?} failed: {}\n{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn set_mtime(p: &Path, sec: u64, nsec: u32) {
    let t = UNIX_EPOCH + Duration::new(sec, nsec);
    File::options()
        .write(true)
        .open(p)
        .unwrap()
        .set_times(FileTimes::new().set_modified(t).set_accessed(t))
        .unwrap();
}

/// A tree with many small files, big files, symlinks, hard links, empty files, deep
/// directories and odd names.
fn make_tree(root: &Path, small: usize, big: usize) {
    let mut n = 0u64;
    for d in 0..(small / 50).max(1) {
        let dir = root
            .join(format!("dir {d}"))
            .join(format!("sub-ü{}", d % 3));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..50 {
            n += 1;
            let p = dir.join(format!("file {f}.txt"));
            fs::write(&p, bytes(n, (n as usize * 37) % 9000)).unwrap();
            set_mtime(&p, 1_500_000_000 + n, (n as u32 * 7919) % 1_000_000_000);
        }
    }
    fs::create_dir_all(root.join("big")).unwrap();
    for i in 0..2 {
        let p = root.join("big").join(format!("big{i}.bin"));
        fs::write(&p, bytes(1000 + i, big - i as usize * 12345)).unwrap();
    }
    fs::create_dir_all(root.join("empty")).unwrap();
    for i in 0..5 {
        File::create(root.join("empty").join(format!("e{i}"))).unwrap();
    }
    let mut deep = root.join("deep");
    for i in 0..20 {
        deep = deep.join(format!("level{i}"));
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("leaf.txt"), b"deep leaf").unwrap();
    for name in [
        "with space",
        "ünïcödé-名前",
        "-leading-dash",
        "quote'\"",
        "tab\there",
    ] {
        fs::write(root.join(name), name.as_bytes()).unwrap();
    }
    let mut secret = Vec::new();
    for _ in 0..10_000 {
        secret.extend_from_slice(MARKER);
    }
    fs::write(root.join("secret-name-qz81.txt"), &secret).unwrap();
    std::os::unix::fs::symlink("dir 0/sub-ü0/file 0.txt", root.join("link-to-file")).unwrap();
    std::os::unix::fs::symlink("nowhere/at/all", root.join("dangling")).unwrap();
    std::os::unix::fs::symlink("deep", root.join("link-dir")).unwrap();
    fs::write(root.join("hard-a"), b"hard linked").unwrap();
    fs::hard_link(root.join("hard-a"), root.join("empty").join("hard-b")).unwrap();
    fs::set_permissions(root.join("with space"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(
        root.join("-leading-dash"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    fs::set_permissions(root.join("quote'\""), fs::Permissions::from_mode(0o444)).unwrap();
    fs::set_permissions(root.join("deep"), fs::Permissions::from_mode(0o700)).unwrap();
    set_mtime(&root.join("hard-a"), 1_234_567_890, 987_654_321);
}

/// Type, mode, size, link count, mtime (ns) and link target of every entry.
fn describe(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let md = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let ft = md.file_type();
            let d = if ft.is_symlink() {
                format!("link -> {}", fs::read_link(&p).unwrap().display())
            } else if ft.is_dir() {
                format!(
                    "dir {:o} mtime {}.{:09}",
                    md.mode() & 0o7777,
                    md.mtime(),
                    md.mtime_nsec()
                )
            } else {
                format!(
                    "file {:o} size {} nlink {} mtime {}.{:09}",
                    md.mode() & 0o7777,
                    md.len(),
                    md.nlink(),
                    md.mtime(),
                    md.mtime_nsec()
                )
            };
            out.insert(rel, d);
            if ft.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn assert_same_tree(src: &Path, dst: &Path) {
    run(Command::new("diff")
        .arg("-r")
        .arg("--no-dereference")
        .arg(src)
        .arg(dst));
    let (a, b) = (describe(src), describe(dst));
    for (k, v) in &a {
        assert_eq!(Some(v), b.get(k), "stat of {k}");
    }
    assert_eq!(a.len(), b.len(), "same entries");
}

fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().unwrap().is_dir() {
                out.extend(walk_files(&e.path()));
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

fn staging_empty(base: &Path) -> bool {
    fs::read_dir(base.join("state").join("staging")).map_or(true, |mut d| d.next().is_none())
}

#[test]
fn cp_and_rsync_round_trip_then_remount() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let src = base.join("src");
    fs::create_dir_all(&src).unwrap();
    // AES-GCM-SIV is generic code instantiated in this crate, so debug builds seal at
    // only ~7 MiB/s: keep the big files moderate there.
    let big = if cfg!(debug_assertions) {
        20 << 20
    } else {
        256 << 20
    };
    make_tree(&src, 2000, big);
    let m = Mount::start(base);

    let t = Instant::now();
    run(Command::new("cp").arg("-a").arg(&src).arg(m.mnt.join("cp")));
    eprintln!("cp -a of the tree: {:?}", t.elapsed());
    assert_same_tree(&src, &m.mnt.join("cp"));

    let t = Instant::now();
    run(Command::new("rsync")
        .arg("-aH")
        .arg(format!("{}/", src.display()))
        .arg(m.mnt.join("rsync")));
    eprintln!("rsync -aH of the tree: {:?}", t.elapsed());
    assert_same_tree(&src, &m.mnt.join("rsync"));
    // mtimes stuck: a second rsync has nothing to transfer.
    let again = run(Command::new("rsync")
        .arg("-aHi")
        .arg(format!("{}/", src.display()))
        .arg(m.mnt.join("rsync")));
    assert!(again.trim().is_empty(), "second rsync changed: {again}");

    // statfs reports the quota.
    let out = run(Command::new("df")
        .arg("-B1")
        .arg("--output=size")
        .arg(&m.mnt));
    assert!(out.contains(&(1u64 << 40).to_string()), "{out}");

    // Wait for every upload, then unmount and mount again: reads now come from chunks.
    let t = Instant::now();
    wait_for("uploads", Duration::from_secs(240), || staging_empty(base));
    eprintln!("uploads finished {:?} after the copies", t.elapsed());
    m.stop();
    let m = Mount::start(base);
    let t = Instant::now();
    assert_same_tree(&src, &m.mnt.join("cp"));
    eprintln!("verify from the backend after remount: {:?}", t.elapsed());
    assert_same_tree(&src, &m.mnt.join("rsync"));

    // No plaintext and no names in the backend.
    let files = walk_files(&base.join("peers"));
    assert!(!files.is_empty());
    for f in &files {
        let name = f.to_string_lossy();
        for leak in ["secret", "file ", "big", "ünïcödé", "leaf"] {
            assert!(!name.contains(leak), "name leaked: {name}");
        }
        let data = fs::read(f).unwrap();
        assert!(
            !data.windows(MARKER.len()).any(|w| w == MARKER),
            "plaintext in {name}"
        );
        assert!(
            !data.windows(12).any(|w| w == b"secret-name-"),
            "name in {name}"
        );
    }
    m.stop();
}

#[test]
fn kill9_while_writing_leaves_old_or_new() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let m = Mount::start(base);
    let n = 12;
    let v1: Vec<Vec<u8>> = (0..n)
        .map(|i| bytes(i, 300_000 + i as usize * 1000))
        .collect();
    let v2: Vec<Vec<u8>> = (0..n)
        .map(|i| bytes(500 + i, 1_500_000 + i as usize * 777))
        .collect();
    for (i, d) in v1.iter().enumerate() {
        let p = m.mnt.join(format!("f{i}"));
        fs::write(&p, d).unwrap();
        File::open(&p).unwrap().sync_all().unwrap(); // fsync: confirmed in the backend
    }
    // Writers rewrite the files over and over while the mount is killed.
    let stop = Arc::new(AtomicBool::new(false));
    // A write refused while the mount was alive (not cut off by the kill): the writer then
    // closes a file holding what it wrote so far, which the drive must keep as written.
    let refused: Arc<Mutex<HashMap<usize, (usize, String)>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..2 {
        let (stop, mnt, v2, refused) = (stop.clone(), m.mnt.clone(), v2.clone(), refused.clone());
        writers.push(std::thread::spawn(move || {
            let mut k = w;
            while !stop.load(Ordering::SeqCst) {
                let i = k % n as usize;
                // Small pieces with pauses, so the kill lands in the middle of files.
                if let Ok(mut f) = File::create(mnt.join(format!("f{i}"))) {
                    let mut written = 0;
                    let mut failed = None;
                    for piece in v2[i].chunks(64 * 1024) {
                        if let Err(e) = f.write_all(piece) {
                            failed = Some(e);
                            break;
                        }
                        written += piece.len();
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    let mut r = refused.lock().unwrap();
                    match failed {
                        // ENOTCONN, ECONNABORTED: the mount is gone (the kill).
                        Some(e) if !matches!(e.raw_os_error(), Some(107) | Some(103)) => {
                            r.insert(i, (written, e.to_string()));
                        }
                        Some(_) => {}
                        None => {
                            r.remove(&i);
                        }
                    }
                }
                k += 2;
            }
        }));
    }
    // Long enough for some files to be rewritten, short enough for others not to be.
    std::thread::sleep(Duration::from_millis(400));
    let mnt = m.mnt.clone();
    // A descriptor open across the kill keeps fusermount3 from auto-unmounting: the next
    // mount must clear the dead mount itself.
    let held = File::open(mnt.join("f0")).unwrap();
    m.kill9();
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    drop(held);
    // Usually auto-unmounted; a dead mount left behind is cleared by the next mount.
    let auto = wait_for_quietly(Duration::from_secs(5), || !is_mounted(&mnt));
    eprintln!("auto-unmounted after kill -9: {auto}");
    let m = Mount::start(base);
    let mounts = fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4) == mnt.to_str())
        .count();
    assert_eq!(mounts, 1, "exactly one mount at the mountpoint");
    let mut new = 0;
    let refused = refused.lock().unwrap().clone();
    if !refused.is_empty() {
        eprintln!("writes refused before the kill: {refused:?}");
    }
    for i in 0..n as usize {
        let got = fs::read(m.mnt.join(format!("f{i}"))).unwrap();
        let as_closed = refused
            .get(&i)
            .is_some_and(|(len, _)| got.len() == *len && got[..] == v2[i][..*len]);
        assert!(
            got == v1[i] || got == v2[i] || as_closed,
            "f{i} is neither old nor new nor what was closed ({} bytes; refused writes: {refused:?})",
            got.len()
        );
        new += (got == v2[i]) as usize;
    }
    eprintln!("{new} of {n} files had their new content after kill -9");
    // Writing works after the restart and survives a clean remount.
    fs::write(m.mnt.join("after"), b"after the crash").unwrap();
    m.stop();
    let m = Mount::start(base);
    assert_eq!(fs::read(m.mnt.join("after")).unwrap(), b"after the crash");
    m.stop();
}

mod random_ops {
    //! A shorter random-operation run through the mount, against a local directory.
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    use std::os::unix::fs::FileExt;

    const NAMES: [&str; 4] = ["a", "b", "d/c", "d/ü x"];

    #[derive(Debug, Clone)]
    enum Op {
        Write {
            f: usize,
            off: u32,
            len: u32,
            seed: u64,
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
        Fsync {
            f: usize,
        },
        Read {
            f: usize,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        let f = 0..NAMES.len();
        prop_oneof![
            5 => (f.clone(), 0..2_000_000u32, 1..400_000u32, any::<u64>())
                .prop_map(|(f, off, len, seed)| Op::Write { f, off, len, seed }),
            2 => (f.clone(), 0..2_000_000u32).prop_map(|(f, size)| Op::Truncate { f, size }),
            2 => (f.clone(), f.clone()).prop_map(|(a, b)| Op::Rename { a, b }),
            1 => f.clone().prop_map(|f| Op::Unlink { f }),
            1 => (f.clone(), f.clone()).prop_map(|(a, b)| Op::Link { a, b }),
            1 => f.clone().prop_map(|f| Op::Fsync { f }),
            2 => f.clone().prop_map(|f| Op::Read { f }),
        ]
    }

    fn errno<T>(r: std::io::Result<T>) -> Result<(), i32> {
        r.map(|_| ()).map_err(|e| e.raw_os_error().unwrap_or(-1))
    }

    fn apply(op: &Op, sides: [&Path; 2]) {
        let results: Vec<Result<(), i32>> = sides
            .iter()
            .map(|root| {
                let p = |i: usize| root.join(NAMES[i]);
                match *op {
                    Op::Write { f, off, len, seed } => errno(
                        File::options()
                            .write(true)
                            .create(true)
                            .truncate(false)
                            .open(p(f))
                            .and_then(|file| {
                                file.write_all_at(&bytes(seed, len as usize), off as u64)
                            }),
                    ),
                    Op::Truncate { f, size } => errno(
                        File::options()
                            .write(true)
                            .open(p(f))
                            .and_then(|file| file.set_len(size as u64)),
                    ),
                    Op::Rename { a, b } => errno(fs::rename(p(a), p(b))),
                    Op::Unlink { f } => errno(fs::remove_file(p(f))),
                    Op::Link { a, b } => errno(fs::hard_link(p(a), p(b))),
                    Op::Fsync { f } => errno(File::open(p(f)).and_then(|file| file.sync_all())),
                    Op::Read { .. } => Ok(()),
                }
            })
            .collect();
        assert_eq!(results[0], results[1], "{op:?}");
        if let Op::Read { f } = *op {
            let a = fs::read(sides[0].join(NAMES[f])).ok();
            let b = fs::read(sides[1].join(NAMES[f])).ok();
            assert!(a == b, "content of {} differs", NAMES[f]);
        }
    }

    fn compare(a: &Path, b: &Path) {
        for name in NAMES {
            let x = fs::read(a.join(name)).ok();
            let y = fs::read(b.join(name)).ok();
            assert!(x == y, "{} differs under {}", name, b.display());
        }
    }

    #[test]
    fn random_ops_through_the_mount() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path();
        let reference = base.join("reference");
        let m = Mount::start(base);
        let mut runner = TestRunner::new(Config {
            cases: 12,
            failure_persistence: None,
            ..Config::default()
        });
        let counter = std::sync::atomic::AtomicUsize::new(0);
        runner
            .run(&prop::collection::vec(op(), 1..16), |ops| {
                let case = counter.fetch_add(1, Ordering::SeqCst) + 1;
                let dirs = [
                    reference.join(format!("{case}")),
                    m.mnt.join(format!("{case}")),
                ];
                for d in &dirs {
                    fs::create_dir_all(d.join("d")).unwrap();
                }
                for op in &ops {
                    apply(op, [&dirs[0], &dirs[1]]);
                }
                compare(&dirs[0], &dirs[1]);
                Ok(())
            })
            .unwrap();
        // Everything is still there after a clean remount.
        m.stop();
        let m = Mount::start(base);
        for c in 1..=counter.load(Ordering::SeqCst) {
            compare(&reference.join(format!("{c}")), &m.mnt.join(format!("{c}")));
        }
        m.stop();
    }
}

/// pjdfstest (crates.io, `cargo install pjdfstest`) against the mount, when installed (on
/// PATH, or named by `PJDFSTEST`); it switches to `nobody` and `daemon`, hence allow_other.
#[test]
fn pjdfstest_against_the_mount() {
    let bin = std::env::var_os("PJDFSTEST")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("PATH")
                .into_iter()
                .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                .map(|d| d.join("pjdfstest"))
                .find(|p| p.exists())
        });
    let Some(bin) = bin else {
        eprintln!("SKIPPED: pjdfstest not installed (cargo install pjdfstest; needs libacl1-dev)");
        return;
    };
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: pjdfstest needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    // pjdfstest's dummy users must be able to reach the mountpoint.
    fs::set_permissions(base, fs::Permissions::from_mode(0o755)).unwrap();
    let config = base.join("pjdfstest.toml");
    fs::write(
        &config,
        "[features]\nposix_fallocate = {}\nutimensat = {}\nutime_now = {}\nrename_ctime = {}\n\
         [settings]\nnaptime = 0.001\nallow_remount = false\n\
         [dummy_auth]\nentries = [[\"nobody\", \"nogroup\"], [\"daemon\", \"daemon\"]]\n",
    )
    .unwrap();
    let m = Mount::start_with(base, &[("PEERSTASH_TEST_OPTIONS", "allow_other")]);
    let dir = m.mnt.join("pjdfstest");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
    let out = Command::new("timeout")
        .arg("300")
        .arg(&bin)
        .arg("-c")
        .arg(&config)
        .arg("-p")
        .arg(&dir)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let failed: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("FAILED") || l.trim_end().ends_with("failed"))
        .collect();
    let summary = text
        .lines()
        .find(|l| l.starts_with("Summary"))
        .unwrap_or("no summary")
        .to_string();
    eprintln!("pjdfstest: {summary}");
    for f in &failed {
        eprintln!("  {f}");
    }
    m.stop();
    assert!(
        summary.starts_with("Summary: 0 failed"),
        "{summary}\n{text}"
    );
}

/// The original C pjdfstest (pjd/pjdfstest, 8,798 subtests, from `../shared/tools/pjdfstest`
/// beside the repository; built here with gcc) run by `prove` as root in a directory of the
/// mount, with allow_other for its dummy users. Skips where the sources, gcc, prove or root
/// are missing.
#[test]
fn c_pjdfstest_against_the_mount() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/pjdfstest");
    if !src.join("build.sh").exists() {
        eprintln!("SKIPPED: no C pjdfstest sources at {}", src.display());
        return;
    }
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: pjdfstest needs root");
        return;
    }
    for tool in ["gcc", "prove"] {
        if !Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success()
        {
            eprintln!("SKIPPED: {tool} not installed");
            return;
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    fs::set_permissions(base, fs::Permissions::from_mode(0o755)).unwrap();
    let suite = base.join("suite");
    let built = Command::new("bash")
        .arg(src.join("build.sh"))
        .arg(&suite)
        .output()
        .unwrap();
    assert!(built.status.success(), "build.sh: {built:?}");
    let m = Mount::start_with(base, &[("PEERSTASH_TEST_OPTIONS", "allow_other")]);
    let dir = m.mnt.join("cpjd");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
    let out = Command::new("timeout")
        .arg("600")
        // The suite mostly sleeps (timestamp checks): run its files in parallel.
        .args(["prove", "-rQ", "-j", "8"])
        .arg(suite.join("tests"))
        .current_dir(&dir)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    m.stop();
    let result = text
        .lines()
        .find(|l| l.starts_with("Result:"))
        .unwrap_or("no result");
    let counts = text.lines().find(|l| l.starts_with("Files=")).unwrap_or("");
    eprintln!("C pjdfstest: {result} ({counts})");
    assert!(out.status.success() && result == "Result: PASS", "{text}");
}

/// Over quota through the kernel: ENOSPC for the write that does not fit, and the rest of
/// the drive keeps working.
#[test]
fn over_quota_enospc_through_the_mount() {
    let tmp = tempfile::tempdir().unwrap();
    let m = Mount::start_with(tmp.path(), &[("PEERSTASH_TEST_CAPACITY", "6000000")]);
    let first = m.mnt.join("first");
    fs::write(&first, bytes(1, 4_000_000)).unwrap();
    File::open(&first).unwrap().sync_all().unwrap();
    // The quota is refreshed after each upload.
    std::thread::sleep(Duration::from_millis(300));
    let err = fs::write(m.mnt.join("second"), bytes(2, 4_000_000)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    fs::create_dir(m.mnt.join("dir")).unwrap();
    fs::write(m.mnt.join("dir").join("small"), b"still works").unwrap();
    assert_eq!(
        fs::read(m.mnt.join("dir").join("small")).unwrap(),
        b"still works"
    );
    assert_eq!(fs::read(&first).unwrap(), bytes(1, 4_000_000));
    let df = run(Command::new("df")
        .arg("-B1")
        .arg("--output=size,avail")
        .arg(&m.mnt));
    assert!(df.contains("6000000") || df.contains("5996544"), "{df}");
    m.stop();
}

/// A slow fetch (a read waiting for the backend) does not hold up other requests.
#[test]
fn slow_fetch_does_not_block_other_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let m = Mount::start(base);
    let data = bytes(5, 3_000_000);
    fs::write(m.mnt.join("remote"), &data).unwrap();
    File::open(m.mnt.join("remote"))
        .unwrap()
        .sync_all()
        .unwrap();
    m.stop();
    let m = Mount::start_with(base, &[("PEERSTASH_TEST_GET_DELAY_MS", "4000")]);
    let path = m.mnt.join("remote");
    let reader = std::thread::spawn(move || fs::read(path).unwrap());
    std::thread::sleep(Duration::from_millis(300));
    // Metadata and writes go through while the read waits for its chunk.
    fs::create_dir(m.mnt.join("meanwhile")).unwrap();
    fs::write(m.mnt.join("meanwhile").join("f"), b"not blocked").unwrap();
    assert_eq!(fs::read_dir(m.mnt.join("meanwhile")).unwrap().count(), 1);
    assert_eq!(
        fs::read(m.mnt.join("meanwhile").join("f")).unwrap(),
        b"not blocked"
    );
    assert!(
        !reader.is_finished(),
        "the slow read should still be waiting"
    );
    assert_eq!(reader.join().unwrap(), data);
    m.stop();
}

/// `run_foreground` (what `peerstash mount` runs) unmounts cleanly on SIGTERM.
#[test]
fn run_foreground_unmounts_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let pidfile = base.join("server.pid");
    let m = Mount::start_with(
        base,
        &[("PEERSTASH_TEST_SIGNALS", pidfile.to_str().unwrap())],
    );
    fs::write(m.mnt.join("kept"), b"kept across SIGTERM").unwrap();
    let pid: i32 = fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    unsafe { libc::kill(pid, libc::SIGTERM) };
    // The test process exits 0 only if run_foreground returned Ok after unmounting.
    let mut m = m;
    let mut p = m.proc.take().unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = p.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    assert!(!is_mounted(&m.mnt));
    drop(m);
    let m = Mount::start(base);
    assert_eq!(
        fs::read(m.mnt.join("kept")).unwrap(),
        b"kept across SIGTERM"
    );
    m.stop();
}
