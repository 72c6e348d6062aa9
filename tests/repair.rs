//! Peers come and go: a real server, four real storage daemons over QUIC and a real FUSE
//! mount. One peer is lost for good; every file still reads; the server notices, has the
//! chunks it held copied peer to peer back to two online replicas (checked through the
//! server and on the daemons' disks); the lost peer comes back and drops the copies that
//! were replaced; then a second peer is lost, and every file still reads.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::net::*;
use common::{bin, wait_for, Proc};

/// The chunk ids a daemon's storage directory holds (file names under `chunks/`).
fn chunks_on(storage: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let Ok(dirs) = fs::read_dir(storage.join("chunks")) else {
        return out;
    };
    for d in dirs.flatten() {
        if let Ok(files) = fs::read_dir(d.path()) {
            for f in files.flatten() {
                out.insert(f.file_name().to_string_lossy().into_owned());
            }
        }
    }
    out
}

fn status(home: &Path) -> String {
    peerstash_ok(home, &["status"])
}

/// Four daemons; heartbeats every second, offline after 3 s, lost (repaired) after 4 s.
fn quick_repair_net() -> Net {
    Net::start_with(
        4,
        &[
            "--heartbeat-interval",
            "1",
            "--online-timeout",
            "3",
            "--repair-grace",
            "4",
            "--repair-interval",
            "1",
        ],
    )
}

/// Copy a tree (with a `large_mib` file) into `user`'s drive and wait until it is on
/// peers; returns the source tree and the mount point.
fn back_up_a_tree(
    net: &Net,
    user: &Path,
    large_mib: usize,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let src = net.dir.path().join("src");
    make_tree(&src, large_mib);
    let mnt = net.dir.path().join("mnt");
    let m = Mount::start(user, &mnt);
    copy_in(&src, &mnt);
    fsync_all(&mnt);
    m.stop();
    (src, mnt)
}

/// Kill `peer` for good, check every file still reads, then wait until the server has
/// seen it go and every chunk is back at its target (`peerstash status`); returns that
/// status.
fn lose_and_wait_for_repair(peer: &mut Proc, user: &Path, mnt: &Path, src: &Path) -> String {
    peer.kill9();
    read_back(user, mnt, src);
    wait_for(
        "the server to see the peer offline",
        Duration::from_secs(30),
        || status(user).contains("peers:    3 online").then_some(()),
    );
    wait_for(
        "every chunk back at its target",
        Duration::from_secs(120),
        || {
            let s = status(user);
            (s.contains("peers:    3 online") && s.contains("safety:   all")).then_some(s)
        },
    )
}

fn read_back(user: &Path, mnt: &Path, src: &Path) {
    let m = Mount::start(user, mnt);
    diff(src, mnt);
    m.stop();
}

#[test]
fn a_lost_peer_is_repaired_back_to_two_replicas_and_a_second_loss_loses_nothing() {
    let mut net = quick_repair_net();
    let user = net.register("alice", "1G");
    let (src, mnt) = back_up_a_tree(&net, &user, 6);
    let before = status(&user);
    assert!(
        before.contains("replicas: 2") && before.contains("on at least 2 online peers"),
        "{before}"
    );

    let stores = net.storage_dirs();
    let lost_chunks = chunks_on(&stores[0]);
    assert!(!lost_chunks.is_empty(), "peer 0 holds nothing to lose");
    let mut peers = net.peers.drain(..).collect::<Vec<Proc>>();

    // Lose peer 0 for good: every file still reads, from the other holder; the server
    // notices it is offline, then lost, and repairs.
    let repaired = lose_and_wait_for_repair(&mut peers[0], &user, &mnt, &src);
    assert!(
        repaired.contains("on at least 2 online peers"),
        "{repaired}"
    );
    // On the daemons' disks too: each chunk the lost peer held is on two live peers.
    let live: Vec<BTreeSet<String>> = stores[1..].iter().map(|d| chunks_on(d)).collect();
    let mut copies: HashMap<&String, usize> = HashMap::new();
    for c in &lost_chunks {
        copies.insert(c, live.iter().filter(|s| s.contains(c)).count());
    }
    let short: Vec<_> = copies.iter().filter(|(_, n)| **n < 2).collect();
    assert!(
        short.is_empty(),
        "chunks of the lost peer on fewer than 2 live peers: {short:?}"
    );

    // The lost peer comes back: the copies that were replaced are surplus and go.
    let mut cmd = Command::new(bin("peerstash"));
    cmd.arg("--home").arg(net.home("peer-0")).arg("serve");
    peers.push(Proc::spawn("peer-0 again", cmd));
    wait_for(
        "the returning peer to drop its replaced copies",
        Duration::from_secs(60),
        || {
            let left: Vec<String> = chunks_on(&stores[0])
                .intersection(&lost_chunks)
                .cloned()
                .collect();
            left.is_empty().then_some(())
        },
    );
    let back = status(&user);
    assert!(
        back.contains("peers:    4 online") && back.contains("safety:   all"),
        "{back}"
    );

    // A second peer lost: every chunk still has an online holder.
    peers[1].kill9();
    read_back(&user, &mnt, &src);
}

/// Bytes of the regular files under `dir` (directories and links not counted).
fn file_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(meta) = fs::symlink_metadata(e.path()) else {
            continue;
        };
        if meta.is_dir() {
            total += file_bytes(&e.path());
        } else if meta.is_file() {
            total += meta.len();
        }
    }
    total
}

/// The same story erasure-coded: 2 data + 1 parity shard per chunk on 3 distinct peers
/// of 4. It lends about 1.5× the data (two replicas would be 2×); a lost peer's shards
/// are recomputed from the other two by a live peer; a second loss still reads.
#[test]
fn erasure_coded_chunks_survive_a_lost_peer_are_rebuilt_and_survive_another() {
    let mut net = quick_repair_net();
    let user = net.register_with("alice", "1G", &["--erasure", "2+1"]);
    let (src, mnt) = back_up_a_tree(&net, &user, 8);
    let before = status(&user);
    assert!(
        before.contains("erasure-coded, 2+1") && before.contains("with all 3 shards online"),
        "{before}"
    );

    // About 1.5× the data on peers, not 2×.
    let stores = net.storage_dirs();
    let data = file_bytes(&src);
    let lent: u64 = stores.iter().map(|d| file_bytes(&d.join("chunks"))).sum();
    let ratio = lent as f64 / data as f64;
    eprintln!("erasure 2+1: {lent} bytes on peers for {data} bytes of files ({ratio:.2}×)");
    assert!(
        (1.4..1.7).contains(&ratio),
        "expected about 1.5× on peers, found {ratio:.2}×"
    );
    let lost_shards = chunks_on(&stores[0]);
    assert!(!lost_shards.is_empty());
    let mut peers = net.peers.drain(..).collect::<Vec<Proc>>();

    // Lose a peer: every chunk rebuilds from the two shards left; its shards are then
    // recomputed on the live peer that holds none of their stripe.
    lose_and_wait_for_repair(&mut peers[0], &user, &mnt, &src);
    let live: BTreeSet<String> = stores[1..].iter().flat_map(|d| chunks_on(d)).collect();
    let missing: Vec<_> = lost_shards.difference(&live).collect();
    assert!(
        missing.is_empty(),
        "shards of the lost peer not rebuilt: {missing:?}"
    );

    // A second loss: two shards of every stripe are left, enough to read everything.
    peers[1].kill9();
    read_back(&user, &mnt, &src);
}
