//! End to end on loopback: a real `peerstash-server`, real `peerstash serve` daemons over
//! QUIC, and a real FUSE mount by `peerstash mount`, all as separate processes in
//! temporary directories. What a user does — copy a tree in, read it back, lose a peer,
//! run out of quota, restart the local cluster — and what they would check.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::net::*;
use common::{bin, bytes, wait_for, Proc};

#[test]
fn drive_round_trips_over_real_peers_and_survives_a_lost_peer() {
    let net = Net::start(3);
    let user = net.register("alice", "1G");
    let src = net.dir.path().join("src");
    make_tree(&src, 12);
    let mnt = net.dir.path().join("mnt");

    let m = Mount::start(&user, &mnt);
    copy_in(&src, &mnt);
    // `status --wait` returns once every closed file is confirmed on peers.
    let waited = run(Command::new(bin("peerstash"))
        .arg("--home")
        .arg(&user)
        .args(["status", "--wait"]));
    assert!(
        waited.contains("every file is confirmed on peers"),
        "{waited}"
    );
    let pending = run(Command::new(bin("peerstash"))
        .arg("--home")
        .arg(&user)
        .arg("status"));
    assert!(pending.contains("pending:  0 uploads"), "{pending}");
    fsync_all(&mnt);
    diff(&src, &mnt);
    assert_eq!(
        stat_tree(&src),
        stat_tree(&mnt),
        "modes, link counts or mtimes differ"
    );
    m.stop();

    // Peers hold ciphertext only: neither contents nor names appear anywhere.
    let stores = net.storage_dirs();
    assert!(
        found_in(std::slice::from_ref(&src), MARKER),
        "the search itself must find the marker"
    );
    assert!(
        !found_in(&stores, MARKER),
        "plaintext marker found in a peer's storage directory"
    );
    for name in ["small-1.txt", "leaf.txt", "sp ace", "large.bin"] {
        assert!(
            !found_in(&stores, name),
            "file name {name:?} found in a peer's storage"
        );
    }
    let stored = stored_bytes(&stores);
    assert!(
        stored > (2 * 12) << 20,
        "two replicas of 12 MiB expected on peers, found {stored} bytes"
    );

    // Remount: what was uploaded reads back from the peers.
    let m = Mount::start(&user, &mnt);
    diff(&src, &mnt);
    assert_eq!(stat_tree(&src), stat_tree(&mnt));
    m.stop();

    // Lose a peer for good, in the middle of an upload: the fsync still succeeds (the
    // chunks go to the peers that are left), and every file still reads (each chunk has
    // another holder).
    let mut peers = net.peers;
    let m = Mount::start(&user, &mnt);
    let late: Vec<u8> = (0..24u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(mnt.join("during-loss.bin"), &late).unwrap();
    let syncing = {
        let p = mnt.join("during-loss.bin");
        std::thread::spawn(move || fs::File::open(p).and_then(|f| f.sync_all()))
    };
    std::thread::sleep(Duration::from_millis(100));
    peers[0].kill9();
    syncing
        .join()
        .unwrap()
        .expect("fsync with a peer killed mid-upload");
    m.stop();
    let m = Mount::start(&user, &mnt);
    assert!(
        fs::read(mnt.join("during-loss.bin")).unwrap() == late,
        "content differs"
    );
    fs::remove_file(mnt.join("during-loss.bin")).unwrap();
    diff(&src, &mnt);
    fs::write(mnt.join("after-loss.txt"), "written with a peer gone").unwrap();
    fsync_all(&mnt);
    m.stop();
    let m = Mount::start(&user, &mnt);
    assert_eq!(
        fs::read_to_string(mnt.join("after-loss.txt")).unwrap(),
        "written with a peer gone"
    );
    // A file stored while only two peers are left has a copy on each.
    let window: Vec<u8> = (0..20u32 << 20)
        .map(|i| (i.wrapping_mul(40503) >> 7) as u8)
        .collect();
    fs::write(mnt.join("window.bin"), &window).unwrap();
    fsync_all(&mnt);
    m.stop();

    // A holder dies while a sequential read has a window of chunks in flight from both:
    // the read still returns every byte (the rest comes from the other holder).
    let m = Mount::start(&user, &mnt);
    let mut f = fs::File::open(mnt.join("window.bin")).unwrap();
    let mut got = Vec::with_capacity(window.len());
    let mut piece = vec![0u8; 128 << 10];
    loop {
        let n = f.read(&mut piece).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&piece[..n]);
        if got.len() == 2 << 20 {
            peers[1].kill9();
        }
    }
    assert!(got == window, "a read across a holder's death differs");
    drop(f);
    m.stop();
}

/// Bytes under the peers' storage directories (`du -sb`).
fn stored_bytes(dirs: &[PathBuf]) -> u64 {
    dirs.iter()
        .map(|d| {
            run(Command::new("du").args(["-sb"]).arg(d))
                .split_whitespace()
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum()
}

#[test]
fn a_clean_unmount_uploads_what_was_copied_in_and_exits_at_once_when_storage_is_down() {
    let mut net = Net::start(3);
    let user = net.register("alice", "1G");
    let mnt = net.dir.path().join("mnt");
    let first = bytes(41, 3 << 20);

    // Unmounted right after the close: the file is on the peers when the process exits.
    let m = Mount::start(&user, &mnt);
    fs::write(mnt.join("first.bin"), &first).unwrap();
    m.stop();
    let stored = stored_bytes(&net.storage_dirs());
    assert!(
        stored >= 2 * first.len() as u64,
        "two replicas of 3 MiB expected on the peers after the unmount, found {stored} bytes"
    );
    let status = peerstash_ok(&user, &["status"]);
    assert!(status.contains("pending:  0 uploads"), "{status}");

    // With the server down the upload fails: the process leaves the file staged and
    // exits by itself (Mount::stop would SIGKILL it after 20 s; check it did not).
    let mut m = Mount::start(&user, &mnt);
    net.kill_server();
    let second = bytes(42, 1 << 20);
    fs::write(mnt.join("second.bin"), &second).unwrap();
    m.proc.terminate_gently(Duration::from_secs(120));
    let status = m.proc.child.try_wait().unwrap().expect("the drive exited");
    assert!(status.success(), "the drive exited with {status}");
    assert!(!is_mounted(&mnt));

    // Back up: the staged file goes out at the next mount and reads back.
    net.restart_server();
    let m = Mount::start(&user, &mnt);
    let waited = peerstash_ok(&user, &["status", "--wait"]);
    assert!(
        waited.contains("every file is confirmed on peers"),
        "{waited}"
    );
    assert_eq!(fs::read(mnt.join("second.bin")).unwrap(), second);
    assert_eq!(fs::read(mnt.join("first.bin")).unwrap(), first);
    m.stop();
}

#[test]
fn over_quota_is_enospc_and_the_rest_keeps_working() {
    let net = Net::start(2);
    // Lending 3 MB allows 2 MB on peers, every replica counted: 1 MB of data at 2 replicas.
    let user = net.register("bob", "3M");
    let mnt = net.dir.path().join("mnt");
    let m = Mount::start(&user, &mnt);
    fs::write(mnt.join("small.txt"), "fits").unwrap();
    fsync_all(&mnt);
    let big = vec![7u8; 3 << 20];
    let err = fs::write(mnt.join("too-big.bin"), &big)
        .and_then(|_| {
            let f = fs::File::open(mnt.join("too-big.bin"))?;
            f.sync_all()
        })
        .expect_err("3 MiB must not fit a 1 MB quota");
    assert_eq!(err.raw_os_error(), Some(libc_enospc()), "{err}");
    // Everything else keeps working.
    fs::create_dir(mnt.join("dir")).unwrap();
    fs::write(mnt.join("dir/also-small.txt"), "still fits").unwrap();
    fsync_all(&mnt.join("dir"));
    assert_eq!(fs::read_to_string(mnt.join("small.txt")).unwrap(), "fits");
    m.stop();
    let m = Mount::start(&user, &mnt);
    assert_eq!(
        fs::read_to_string(mnt.join("dir/also-small.txt")).unwrap(),
        "still fits"
    );
    m.stop();
}

fn libc_enospc() -> i32 {
    28
}

#[test]
fn local_cluster_starts_stops_and_keeps_files() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mnt = dir.path().join("mnt");
    // local-cluster runs the server binary found beside its own: make sure it is built.
    bin("peerstash-server");
    let start = || {
        let mut cmd = Command::new(bin("peerstash"));
        cmd.args(["local-cluster", "--peers", "2", "--lend", "200M"])
            .arg("--state")
            .arg(&state)
            .arg("--mount")
            .arg(&mnt);
        let mut p = Proc::spawn("local-cluster", cmd);
        wait_for("local-cluster's mount", Duration::from_secs(60), || {
            if let Ok(Some(s)) = p.child.try_wait() {
                panic!("local-cluster exited early: {s}");
            }
            is_mounted(&mnt).then_some(())
        });
        p
    };
    let mut p = start();
    fs::write(mnt.join("kept.txt"), "survives a restart").unwrap();
    fsync_all(&mnt);
    // Ctrl-C: the mount goes away and every process stops.
    unsafe_sigint(p.pid());
    wait_for("local-cluster to stop", Duration::from_secs(30), || {
        p.child.try_wait().unwrap().map(|_| ())
    });
    assert!(!is_mounted(&mnt));
    let left = Command::new("pgrep")
        .arg("-af")
        .arg(state.as_os_str())
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "processes left behind: {}",
        String::from_utf8_lossy(&left.stdout)
    );

    let mut p = start();
    assert_eq!(
        fs::read_to_string(mnt.join("kept.txt")).unwrap(),
        "survives a restart"
    );
    unsafe_sigint(p.pid());
    wait_for("local-cluster to stop", Duration::from_secs(30), || {
        p.child.try_wait().unwrap().map(|_| ())
    });
    assert!(!is_mounted(&mnt));
}

/// Peers online, as `peerstash status` shows it to `home`.
fn online(home: &Path) -> usize {
    let s = run(Command::new(bin("peerstash"))
        .arg("--home")
        .arg(home)
        .arg("status"));
    let line = s
        .lines()
        .find(|l| l.starts_with("peers:"))
        .expect("a peers line");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn the_server_checks_quiet_peers_itself() {
    // Daemons heartbeat once an hour here; the online timeout is 3 s. Only the server's
    // own authenticated status checks over QUIC can keep them online.
    let mut net = Net::start_with(
        2,
        &["--online-timeout", "3", "--heartbeat-interval", "3600"],
    );
    let user = net.register("carol", "10M");
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(
        online(&user),
        2,
        "answering peers stay online between heartbeats"
    );
    net.peers[0].kill9();
    wait_for(
        "the killed peer to go offline",
        Duration::from_secs(15),
        || (online(&user) == 1).then_some(()),
    );
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        online(&user),
        1,
        "the live peer is still checked and online"
    );
}

fn unsafe_sigint(pid: u32) {
    run(Command::new("kill").arg("-INT").arg(pid.to_string()));
}

fn snapshot_version(home: &Path) -> u64 {
    let s = run(Command::new(bin("peerstash"))
        .arg("--home")
        .arg(home)
        .arg("status"));
    s.lines()
        .find_map(|l| l.strip_prefix("snapshot: version "))
        .map_or(0, |v| v.split_whitespace().next().unwrap().parse().unwrap())
}

fn snapshot_up_to_date(home: &Path) -> bool {
    let s = run(Command::new(bin("peerstash"))
        .arg("--home")
        .arg(home)
        .arg("status"));
    s.lines()
        .any(|l| l.starts_with("snapshot: version ") && l.ends_with("(up to date)"))
}

/// Log in as `name` into the fresh home `home`, checking it worked.
fn relogin(net: &Net, name: &str, home: &Path, extra: &[&str]) {
    let out = net.login(name, home, extra);
    assert!(
        out.status.success(),
        "login failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Wait until the mounted drive's latest snapshot covers everything, then kill the mount
/// (no clean unmount, so no final snapshot) and wipe the home.
fn crash_and_wipe(m: Mount, home: &Path) {
    wait_for("an up-to-date snapshot", Duration::from_secs(60), || {
        snapshot_up_to_date(home).then_some(())
    });
    let mut m = m;
    m.proc.kill9();
    drop(m); // lazy fusermount3 -u of the dead mount
    fs::remove_dir_all(home).unwrap();
}

/// Copy a tree in, wait for a snapshot, wipe the home, log in again into a new home, mount:
/// the same tree comes back. Returns the net and the source tree.
fn wipe_and_restore(passphrase: bool) -> (Net, PathBuf) {
    let net = Net::start(3);
    let pass = net.dir.path().join("passphrase");
    fs::write(&pass, "a long recovery passphrase, never sent\n").unwrap();
    let pass_s = pass.to_string_lossy().to_string();
    let mode: Vec<&str> = if passphrase {
        vec!["--key-mode", "passphrase", "--passphrase-file", &pass_s]
    } else {
        vec![]
    };
    let user = net.register_with("alice", "1G", &mode);
    let src = net.dir.path().join("src");
    make_tree(&src, 2);
    let mnt = net.dir.path().join("mnt");
    let m = Mount::start_with(&user, &mnt, Some("snapshot_interval=1"));
    copy_in(&src, &mnt);
    fsync_all(&mnt);
    // Snapshots are taken while mounted, once uploads settle (and at a clean unmount).
    wait_for("a snapshot", Duration::from_secs(60), || {
        (snapshot_version(&user) > 0).then_some(())
    });
    m.stop();

    // The machine is wiped: nothing of the home is left.
    fs::remove_dir_all(&user).unwrap();
    fs::remove_dir_all(&mnt).unwrap();
    let home = net.dir.path().join("alice-reinstalled");
    let extra: Vec<&str> = if passphrase {
        vec!["--passphrase-file", &pass_s]
    } else {
        vec![]
    };
    relogin(&net, "alice", &home, &extra);
    let m = Mount::start(&home, &mnt);
    diff(&src, &mnt);
    assert_eq!(
        stat_tree(&src),
        stat_tree(&mnt),
        "modes, link counts or mtimes differ after the restore"
    );
    m.stop();
    (net, src)
}

#[test]
fn a_wiped_home_gets_everything_back_escrow_mode() {
    wipe_and_restore(false);
}

#[test]
fn snapshots_are_continuous_a_killed_mount_then_a_wiped_home_loses_nothing_twice() {
    let net = Net::start(3);
    let first = net.register("bob", "1G");
    let src = net.dir.path().join("src");
    make_tree(&src, 1);
    let mnt = net.dir.path().join("mnt");
    let m = Mount::start_with(&first, &mnt, Some("snapshot_interval=1"));
    copy_in(&src, &mnt);
    fsync_all(&mnt);
    crash_and_wipe(m, &first);

    // Round 1: restored from the snapshot taken while mounted. Then change things.
    let second = net.dir.path().join("bob-2");
    relogin(&net, "bob", &second, &[]);
    let m = Mount::start_with(&second, &mnt, Some("snapshot_interval=1"));
    diff(&src, &mnt);
    assert_eq!(stat_tree(&src), stat_tree(&mnt));
    for root in [&src, &mnt] {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(root.join("deep/a/small-5.txt"))
            .unwrap();
        f.write_all(b"appended after the restore\n").unwrap();
        drop(f);
        fs::write(root.join("new-after-restore.txt"), "new\n").unwrap();
        fs::remove_file(root.join("deep/a/small-7.txt")).unwrap();
        fs::rename(root.join("empty"), root.join("deep/empty-moved")).unwrap();
    }
    // The same mtimes on both sides, so that the trees compare whole.
    for f in ["deep/a/small-5.txt", "new-after-restore.txt"] {
        run(Command::new("touch")
            .arg("-r")
            .arg(src.join(f))
            .arg(mnt.join(f)));
    }
    fsync_all(&mnt);
    crash_and_wipe(m, &second);

    // Round 2: the changes made on the restored drive came through a second wipe too.
    let third = net.dir.path().join("bob-3");
    relogin(&net, "bob", &third, &[]);
    let m = Mount::start(&third, &mnt);
    diff(&src, &mnt);
    let (a, b) = (stat_tree(&src), stat_tree(&mnt));
    // Directories changed at different instants in the two trees: compare the rest.
    let files =
        |v: Vec<String>| -> Vec<String> { v.into_iter().filter(|l| !l.contains(" d")).collect() };
    assert_eq!(files(a), files(b));
    m.stop();
}

#[test]
fn a_wiped_home_gets_everything_back_passphrase_mode_and_a_wrong_passphrase_is_refused() {
    let (net, _src) = wipe_and_restore(true);
    let wrong = net.dir.path().join("wrong-passphrase");
    fs::write(&wrong, "not the passphrase at all\n").unwrap();
    let home = net.dir.path().join("alice-wrong");
    let out = net.login(
        "alice",
        &home,
        &["--passphrase-file", &wrong.to_string_lossy()],
    );
    if !out.status.success() {
        // Refusing at login is fine too, as long as it says why.
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("passphrase"), "unclear login error: {err}");
        return;
    }
    let mnt = net.dir.path().join("mnt-wrong");
    fs::create_dir_all(&mnt).unwrap();
    let mut child = Command::new(bin("peerstash"))
        .arg("--home")
        .arg(&home)
        .arg("mount")
        .arg(&mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_for("the mount to refuse", Duration::from_secs(30), || {
        child.try_wait().unwrap()
    });
    assert!(!is_mounted(&mnt), "mounted with a wrong passphrase");
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    eprintln!("the mount with a wrong passphrase said: {err}");
    assert!(!status.success());
    assert!(
        err.contains("this data key cannot open your snapshots: wrong passphrase?"),
        "unclear error: {err}"
    );
    assert!(
        !home.join("drive/index.sqlite").exists(),
        "no index may be built from a snapshot that did not open"
    );
}

/// `peerstash status --wait` as a script runs it: its exit status and what it printed.
fn status_wait(home: &Path) -> (bool, String) {
    let out = Command::new(bin("peerstash"))
        .arg("--home")
        .arg(home)
        .args(["status", "--wait", "--wait-limit", "60"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Near the quota a delete gives its space back over real peers (before, the drive
/// wedged: ENOSPC for good, the deleted file's chunks held for a snapshot that could not
/// be stored); `status --wait` rides out a server restart; and with uploads pending and
/// no drive mounted it ends with the reason instead of waiting for ever.
#[test]
fn near_the_quota_deletes_give_space_back_and_status_wait_always_ends() {
    let mut net = Net::start(3);
    // Lending 12M allows 8M on peers, every replica counted: 4 MB of data at 2 replicas.
    let user = net.register("dana", "12M");
    let mnt = net.dir.path().join("mnt");
    // Snapshots every 2 s (default 30) only to keep the test short.
    let m = Mount::start_with(&user, &mnt, Some("snapshot_interval=2"));
    let (first, second) = (bytes(1, 2_600_000), bytes(2, 2_600_000));
    fs::write(mnt.join("first.bin"), &first).unwrap();
    let (ok, text) = status_wait(&user);
    assert!(ok, "{text}");
    wait_for(
        "a snapshot naming the first file",
        Duration::from_secs(60),
        || snapshot_up_to_date(&user).then_some(()),
    );
    fs::remove_file(mnt.join("first.bin")).unwrap();
    fs::write(mnt.join("second.bin"), &second).expect("the deleted file's space is writable");
    let (ok, text) = status_wait(&user);
    assert!(ok, "the second file reaches the peers: {text}");
    let status = run(Command::new(bin("peerstash"))
        .arg("--home")
        .arg(&user)
        .arg("status"));
    assert!(status.contains("dropped before their time"), "{status}");

    // The server restarts (kill -9, back 5 s later) while a file waits for upload.
    net.kill_server();
    fs::write(mnt.join("third.txt"), "written while the server was down").unwrap();
    let restart = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(5));
        net.restart_server();
        net
    });
    let (ok, text) = status_wait(&user);
    let mut net = restart.join().unwrap();
    assert!(ok, "status --wait rides out a short outage: {text}");
    assert!(text.contains("server unreachable"), "{text}");

    // Uploads pending and the drive killed: no progress is possible, and it says so.
    net.kill_server();
    fs::write(mnt.join("fourth.txt"), "never uploaded in this test").unwrap();
    let mut m = m;
    m.proc.kill9();
    drop(m);
    net.restart_server();
    let (ok, text) = status_wait(&user);
    assert!(!ok, "{text}");
    assert!(text.contains("the drive is not mounted"), "{text}");

    // Mounted again, everything is there and the pending file goes up.
    let m = Mount::start(&user, &mnt);
    let (ok, text) = status_wait(&user);
    assert!(ok, "{text}");
    assert_eq!(fs::read(mnt.join("second.bin")).unwrap(), second);
    assert!(!mnt.join("first.bin").exists());
    assert_eq!(
        fs::read_to_string(mnt.join("fourth.txt")).unwrap(),
        "never uploaded in this test"
    );
    m.stop();
}
