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
    run(Command::new(bin("peerstash"))
        .arg("--home")
        .arg(home)
        .arg("status"))
}

fn read_back(user: &Path, mnt: &Path, src: &Path) {
    let m = Mount::start(user, mnt);
    diff(src, mnt);
    m.stop();
}

#[test]
fn a_lost_peer_is_repaired_back_to_two_replicas_and_a_second_loss_loses_nothing() {
    // Heartbeats every second, offline after 3 s, lost (repaired) after 4 s.
    let mut net = Net::start_with(
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
    );
    let user = net.register("alice", "1G");
    let src = net.dir.path().join("src");
    make_tree(&src, 6);
    let mnt = net.dir.path().join("mnt");
    let m = Mount::start(&user, &mnt);
    copy_in(&src, &mnt);
    fsync_all(&mnt);
    m.stop();
    let before = status(&user);
    assert!(
        before.contains("replicas: 2") && before.contains("on at least 2 online peers"),
        "{before}"
    );

    let stores = net.storage_dirs();
    let lost_chunks = chunks_on(&stores[0]);
    assert!(!lost_chunks.is_empty(), "peer 0 holds nothing to lose");
    let mut peers = net.peers.drain(..).collect::<Vec<Proc>>();

    // Lose peer 0 for good: every file still reads, from the other holder.
    eprintln!("test: killing peer 0");
    peers[0].kill9();
    read_back(&user, &mnt, &src);

    // The server notices it is offline, then lost, and repairs.
    wait_for(
        "the server to see peer 0 offline",
        Duration::from_secs(30),
        || status(&user).contains("peers:    3 online").then_some(()),
    );
    let repaired = wait_for(
        "every chunk back on 2 online peers",
        Duration::from_secs(120),
        || {
            let s = status(&user);
            (s.contains("peers:    3 online") && s.contains("on at least 2 online peers"))
                .then_some(s)
        },
    );
    assert!(repaired.contains("safety:   all"), "{repaired}");
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
    eprintln!("test: peer 0 comes back");
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
    eprintln!("test: killing peer 1");
    peers[1].kill9();
    read_back(&user, &mnt, &src);
}
