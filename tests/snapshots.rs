//! Earlier snapshots, end to end: a real server, three storage daemons over QUIC and a real
//! FUSE mount. An `rm -rf` in the mount is undone by `peerstash restore` from the snapshot
//! taken before it — even after the drive's release pass, because a retained snapshot's
//! chunks are not released — and an expired snapshot's chunks do go.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::net::*;
use common::{bin, wait_for};

fn peerstash(home: &Path, args: &[&str]) -> Output {
    Command::new(bin("peerstash"))
        .arg("--home")
        .arg(home)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ok(home: &Path, args: &[&str]) -> String {
    peerstash_ok(home, args)
}

/// `peerstash restore --snapshot ID --to TO [--path PATH]`, which must succeed.
fn restore_to(home: &Path, id: &str, to: &Path, path: Option<&str>) {
    let to = to.to_string_lossy().to_string();
    let mut args = vec!["restore", "--snapshot", id, "--to", &to];
    if let Some(p) = path {
        args.extend(["--path", p]);
    }
    ok(home, &args);
}

/// `peerstash restore` that must fail: its stderr.
fn refused(home: &Path, args: &[&str]) -> String {
    let out = peerstash(home, args);
    assert!(
        !out.status.success(),
        "peerstash {args:?} should have failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The IDs `peerstash snapshots` lists, newest first, and which one it marks latest.
fn snapshot_ids(home: &Path) -> (Vec<u64>, Option<u64>) {
    let out = ok(home, &["snapshots"]);
    eprintln!("peerstash snapshots:\n{out}");
    let mut ids = Vec::new();
    let mut latest = None;
    for l in out.lines().skip(1) {
        if let Some(id) = l.split_whitespace().next().and_then(|w| w.parse().ok()) {
            ids.push(id);
            if l.ends_with("(latest)") {
                latest = Some(id);
            }
        }
    }
    (ids, latest)
}

/// The `status` lines a user reads to see the drive settled.
struct Settled {
    version: u64,
    up_to_date: bool,
    held_chunks: u64,
    to_release: u64,
}

fn settled(home: &Path) -> Settled {
    let s = ok(home, &["status"]);
    let mut r = Settled {
        version: 0,
        up_to_date: false,
        held_chunks: 0,
        to_release: u64::MAX,
    };
    for l in s.lines() {
        if let Some(v) = l.strip_prefix("snapshot: version ") {
            r.version = v.split_whitespace().next().unwrap().parse().unwrap();
            r.up_to_date = l.ends_with("(up to date)");
        }
        if let Some(k) = l.strip_prefix("kept:") {
            // "kept: N snapshots (...); H chunks (SIZE) held only for earlier ones; R to release"
            let parts: Vec<&str> = k.split(';').map(str::trim).collect();
            r.held_chunks = parts[1].split_whitespace().next().unwrap().parse().unwrap();
            r.to_release = parts[2].split_whitespace().next().unwrap().parse().unwrap();
        }
    }
    r
}

/// Mount with snapshots every second, copy `src` in, and wait until a snapshot holds it;
/// returns the mount and that snapshot's version.
fn copy_in_and_snapshot(user: &Path, src: &Path, mnt: &Path) -> (Mount, u64) {
    let m = Mount::start_with(user, mnt, Some("snapshot_interval=1"));
    copy_in(src, mnt);
    fsync_all(mnt);
    let version = wait_for("a snapshot of the tree", Duration::from_secs(90), || {
        let s = settled(user);
        (s.version > 0 && s.up_to_date).then_some(s.version)
    });
    (m, version)
}

fn files_under(dirs: &[PathBuf]) -> usize {
    let out = run(Command::new("find").args(dirs).args(["-type", "f"]));
    out.lines().count()
}

fn set_xattr(p: &Path, name: &str, value: &str) -> bool {
    Command::new("python3")
        .arg("-c")
        .arg("import os,sys; os.setxattr(sys.argv[1], sys.argv[2], sys.argv[3].encode())")
        .arg(p)
        .args([name, value])
        .status()
        .unwrap()
        .success()
}

fn get_xattr(p: &Path, name: &str) -> Option<String> {
    let out = Command::new("python3")
        .arg("-c")
        .arg("import os,sys; print(os.getxattr(sys.argv[1], sys.argv[2]).decode())")
        .arg(p)
        .arg(name)
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn rm_rf_in_the_mount_is_undone_by_restoring_the_earlier_snapshot() {
    let net = Net::start(3);
    let user = net.register("alice", "1G");
    assert!(
        ok(&user, &["snapshots"]).contains("no snapshots yet"),
        "a new user has no snapshots"
    );
    let src = net.dir.path().join("src");
    make_tree(&src, 2);
    let xattr = set_xattr(&src.join("deep/a/small-5.txt"), "user.color", "blue");
    let mnt = net.dir.path().join("mnt");
    let (m, before) = copy_in_and_snapshot(&user, &src, &mnt);
    let (ids, latest) = snapshot_ids(&user);
    assert_eq!(
        latest,
        Some(before),
        "`snapshots` marks the latest: {ids:?}"
    );
    let stored_before = files_under(&net.storage_dirs());

    // The accident.
    for e in fs::read_dir(&mnt).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() && !p.is_symlink() {
            fs::remove_dir_all(&p).unwrap();
        } else {
            fs::remove_file(&p).unwrap();
        }
    }
    assert_eq!(fs::read_dir(&mnt).unwrap().count(), 0);
    // The drive settles: a snapshot of the empty tree, and its release pass done — the
    // deleted files' chunks are held for the earlier snapshot, nothing left to release.
    let after = wait_for(
        "a snapshot of the empty tree and the release pass",
        Duration::from_secs(90),
        || {
            let s = settled(&user);
            (s.version > before && s.up_to_date && s.held_chunks > 0 && s.to_release == 0)
                .then_some(s.version)
        },
    );
    let (ids, latest) = snapshot_ids(&user);
    assert_eq!(latest, Some(after));
    assert!(
        ids.contains(&before),
        "the earlier snapshot is kept: {ids:?}"
    );
    assert!(
        files_under(&net.storage_dirs()) >= stored_before,
        "peers still hold every chunk"
    );

    // Restore the earlier snapshot: the same tree, modes, mtimes, link counts.
    let out = net.dir.path().join("out");
    let id = before.to_string();
    let to = out.to_string_lossy().to_string();
    let restored = peerstash(&user, &["restore", "--snapshot", &id, "--to", &to]);
    assert!(restored.status.success());
    eprintln!("{}", String::from_utf8_lossy(&restored.stderr));
    diff(&src, &out);
    assert_eq!(
        stat_tree(&src),
        stat_tree(&out),
        "modes, link counts or mtimes differ after the restore"
    );
    let meta = |p: &str| fs::symlink_metadata(out.join(p)).unwrap();
    assert_eq!(
        meta("hard").ino(),
        meta("deep/a/small-2.txt").ino(),
        "a hard link comes back as a hard link"
    );
    assert_eq!(
        meta("deep/a/small-3.txt").permissions().mode() & 0o7777,
        0o600
    );
    assert_eq!(
        meta("large.bin").mtime(),
        fs::metadata(src.join("large.bin")).unwrap().mtime()
    );
    assert_eq!(
        fs::read_link(out.join("dangling")).unwrap(),
        Path::new("/nonexistent/target")
    );
    if xattr {
        assert_eq!(
            get_xattr(&out.join("deep/a/small-5.txt"), "user.color").as_deref(),
            Some("blue"),
            "user xattrs come back"
        );
    }
    let leftovers = run(Command::new("find")
        .arg(&out)
        .args(["-name", ".peerstash-restore-*"]));
    assert!(leftovers.is_empty(), "temporary files left: {leftovers}");

    // A directory inside the snapshot, and a single file.
    let part = net.dir.path().join("part");
    restore_to(&user, &id, &part, Some("deep/a/b"));
    diff(&src.join("deep/a/b"), &part);
    let one = net.dir.path().join("one");
    restore_to(&user, &id, &one, Some("/deep/a/small-3.txt"));
    assert_eq!(
        fs::read(one.join("small-3.txt")).unwrap(),
        fs::read(src.join("deep/a/small-3.txt")).unwrap()
    );
    // `latest` is the empty tree.
    let now = net.dir.path().join("now");
    restore_to(&user, "latest", &now, None);
    assert_eq!(fs::read_dir(&now).unwrap().count(), 0);

    // Refusals, each with nothing written.
    let err = refused(&user, &["restore", "--snapshot", &id, "--to", &to]);
    assert!(err.contains("is not empty"), "{err}");
    diff(&src, &out);
    let nowhere = net.dir.path().join("nowhere");
    let nowhere_s = nowhere.to_string_lossy().to_string();
    let err = refused(
        &user,
        &["restore", "--snapshot", "12345", "--to", &nowhere_s],
    );
    assert!(
        err.contains("no snapshot 12345") && err.contains("peerstash snapshots"),
        "{err}"
    );
    let err = refused(
        &user,
        &[
            "restore",
            "--snapshot",
            &id,
            "--to",
            &nowhere_s,
            "--path",
            "deep/nope",
        ],
    );
    assert!(
        err.contains("\"deep/nope\" is not in this snapshot"),
        "{err}"
    );
    let err = refused(
        &user,
        &["restore", "--snapshot", "yesterday", "--to", &nowhere_s],
    );
    assert!(err.contains("`latest`"), "{err}");
    assert!(!nowhere.exists(), "a refused restore writes nothing");
    eprintln!("{}", ok(&user, &["status"]));
    m.stop();

    // Keep earlier snapshots for one second only: the earlier one expires, its root goes,
    // its chunks are released and peers drop them.
    let m = Mount::start_with(&user, &mnt, Some("snapshot_interval=1,snapshot_keep=1s"));
    wait_for(
        "the earlier snapshots to expire",
        Duration::from_secs(90),
        || {
            let (ids, _) = snapshot_ids(&user);
            let s = settled(&user);
            (ids.len() == 1 && s.held_chunks == 0 && s.to_release == 0).then_some(())
        },
    );
    let err = refused(&user, &["restore", "--snapshot", &id, "--to", &nowhere_s]);
    assert!(err.contains(&format!("no snapshot {id}")), "{err}");
    wait_for(
        "peers to drop the released chunks",
        Duration::from_secs(90),
        || (files_under(&net.storage_dirs()) < stored_before).then_some(()),
    );
    m.stop();
}

/// The machine dies after the accident: the reinstalled drive comes back as it was last
/// (empty), and the snapshot from before the accident still restores — even after the
/// new drive stored, deleted and released chunks of its own with the same content.
#[test]
fn after_a_reinstall_the_earlier_snapshots_stay_restorable() {
    let net = Net::start(3);
    let user = net.register("alice", "1G");
    let src = net.dir.path().join("src");
    make_tree(&src, 1);
    let mnt = net.dir.path().join("mnt");
    let (m, before) = copy_in_and_snapshot(&user, &src, &mnt);
    run(Command::new("find")
        .arg(&mnt)
        .args(["-mindepth", "1", "-delete"]));
    wait_for(
        "a snapshot of the empty tree",
        Duration::from_secs(90),
        || {
            let s = settled(&user);
            (s.version > before && s.up_to_date).then_some(())
        },
    );
    let mut m = m;
    m.proc.kill9();
    drop(m);
    fs::remove_dir_all(&user).unwrap();

    let home = net.dir.path().join("alice-reinstalled");
    let out = net.login("alice", &home, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // No snapshot is due for an hour: what follows is named by none until the unmount.
    let m = Mount::start_with(&home, &mnt, Some("snapshot_interval=3600"));
    assert_eq!(fs::read_dir(&mnt).unwrap().count(), 0, "the latest: empty");
    let (ids, _) = snapshot_ids(&home);
    assert!(ids.contains(&before), "{ids:?}");
    run(Command::new("cp").arg("-a").arg(src.join("deep")).arg(&mnt));
    fsync_all(&mnt);
    fs::remove_dir_all(mnt.join("deep")).unwrap();
    m.stop();
    // Mounted again: the release pass runs once the (unmount's) snapshot is current.
    let m = Mount::start_with(&home, &mnt, Some("snapshot_interval=1"));
    wait_for("the drive to settle", Duration::from_secs(90), || {
        let s = settled(&home);
        (s.up_to_date && s.held_chunks > 0 && s.to_release == 0).then_some(())
    });
    let restored = net.dir.path().join("out");
    restore_to(&home, &before.to_string(), &restored, None);
    diff(&src, &restored);
    m.stop();
}

#[test]
fn snapshots_and_restore_need_a_registered_home() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("nobody");
    let err = refused(&home, &["snapshots"]);
    assert!(err.contains("peerstash register"), "{err}");
    let to = dir.path().join("out");
    let err = refused(
        &home,
        &["restore", "--snapshot", "1", "--to", &to.to_string_lossy()],
    );
    assert!(err.contains("peerstash login"), "{err}");
    assert!(!to.exists());
}
