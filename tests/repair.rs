//! Peers come and go: a real server, four real storage daemons over QUIC and a real FUSE
//! mount. One peer is lost for good; every file still reads; the server notices, has the
//! chunks it held copied peer to peer back to two online replicas (checked through the
//! server and on the daemons' disks); the lost peer comes back and drops the copies that
//! were replaced; then a second peer is lost, and every file still reads. Audits catch
//! peers that keep heartbeating but lost (deleted, corrupted, never kept) what they hold.

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

/// The daemon holding the most chunks. A put's copies go to as few peers as they need,
/// so with a small tree one daemon may hold little or nothing: the tests that lose or
/// corrupt a holder pick this one, which holds enough to fail several audits.
fn busiest(stores: &[std::path::PathBuf]) -> usize {
    (0..stores.len())
        .max_by_key(|i| chunks_on(&stores[*i]).len())
        .expect("peers")
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
    let lost = busiest(&stores);
    let lost_chunks = chunks_on(&stores[lost]);
    assert!(!lost_chunks.is_empty(), "no peer holds anything to lose");
    let mut peers = net.peers.drain(..).collect::<Vec<Proc>>();

    // Lose that peer for good: every file still reads, from the other holder; the server
    // notices it is offline, then lost, and repairs.
    let repaired = lose_and_wait_for_repair(&mut peers[lost], &user, &mnt, &src);
    assert!(
        repaired.contains("on at least 2 online peers"),
        "{repaired}"
    );
    // On the daemons' disks too: each chunk the lost peer held is on two live peers.
    let live: Vec<BTreeSet<String>> = (0..stores.len())
        .filter(|i| *i != lost)
        .map(|i| chunks_on(&stores[i]))
        .collect();
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
    cmd.arg("--home")
        .arg(net.home(&format!("peer-{lost}")))
        .arg("serve");
    peers.push(Proc::spawn("the lost peer again", cmd));
    wait_for(
        "the returning peer to drop its replaced copies",
        Duration::from_secs(60),
        || {
            let left: Vec<String> = chunks_on(&stores[lost])
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
    peers[(lost + 1) % 4].kill9();
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
    let lost = busiest(&stores);
    let lost_shards = chunks_on(&stores[lost]);
    assert!(!lost_shards.is_empty());
    let mut peers = net.peers.drain(..).collect::<Vec<Proc>>();

    // Lose a peer: every chunk rebuilds from the two shards left; its shards are then
    // recomputed on the live peer that holds none of their stripe.
    lose_and_wait_for_repair(&mut peers[lost], &user, &mnt, &src);
    let live: BTreeSet<String> = (0..stores.len())
        .filter(|i| *i != lost)
        .flat_map(|i| chunks_on(&stores[i]))
        .collect();
    let missing: Vec<_> = lost_shards.difference(&live).collect();
    assert!(
        missing.is_empty(),
        "shards of the lost peer not rebuilt: {missing:?}"
    );

    // A second loss: two shards of every stripe are left, enough to read everything.
    peers[(lost + 1) % 4].kill9();
    read_back(&user, &mnt, &src);
}

/// Four daemons as in [`quick_repair_net`], every stored chunk audited at least every 4 s.
fn quick_audit_net() -> Net {
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
            "--audit-interval",
            "4",
        ],
    )
}

/// The peer other than `bad` that shares the most chunks with it, and those chunks: the
/// one whose loss would take data with it if `bad`'s copies were not replaced.
fn partner_of(stores: &[std::path::PathBuf], bad: usize) -> (usize, BTreeSet<String>) {
    let held = chunks_on(&stores[bad]);
    (0..stores.len())
        .filter(|i| *i != bad)
        .map(|i| {
            (
                i,
                held.intersection(&chunks_on(&stores[i])).cloned().collect(),
            )
        })
        .max_by_key(|(_, shared): &(usize, BTreeSet<String>)| shared.len())
        .expect("other peers")
}

fn chunk_path(storage: &Path, name: &str) -> std::path::PathBuf {
    for d in fs::read_dir(storage.join("chunks")).unwrap().flatten() {
        let p = d.path().join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("chunk {name} not under {}", storage.display());
}

/// The server catches `bad` by auditing it (its own status shows failed audits and that
/// it receives no placements), and every chunk in `affected` is back on two peers other
/// than `bad`; then `partner`, the other holder of those chunks, is lost for good, and
/// every file still reads, byte for byte, from a fresh mount.
#[allow(clippy::too_many_arguments)]
fn caught_replaced_and_survives(
    net: &Net,
    stores: &[std::path::PathBuf],
    peers: &mut [Proc],
    user: &Path,
    bad: usize,
    partner: usize,
    affected: &BTreeSet<String>,
    src: &Path,
    mnt: &Path,
) {
    let bad_home = net.home(&format!("peer-{bad}"));
    let bad_status = wait_for(
        "the server to catch the bad holder in audits",
        Duration::from_secs(120),
        || {
            let s = status(&bad_home);
            let failed = s
                .lines()
                .find_map(|l| l.strip_prefix("audits:"))
                .and_then(|l| l.split(" passed, ").nth(1))
                .and_then(|l| l.split(' ').next())
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(0);
            (failed >= affected.len().min(3)).then_some(s)
        },
    );
    eprintln!("{bad_status}");
    wait_for(
        "every affected chunk on two peers besides the bad one",
        Duration::from_secs(180),
        || {
            // Chunks the drive released since (older snapshots' index chunks) are gone
            // from the partner too: they no longer count.
            let on_partner = chunks_on(&stores[partner]);
            let ok = affected.intersection(&on_partner).all(|c| {
                (0..stores.len())
                    .filter(|i| *i != bad && chunks_on(&stores[*i]).contains(c))
                    .count()
                    >= 2
            });
            (ok && status(user).contains("safety:   all")).then_some(())
        },
    );
    // Lose the partner for good: without the audits, the chunks it shared with the bad
    // holder would now be gone.
    peers[partner].kill9();
    read_back(user, mnt, src);
}

/// A peer deletes everything it holds and keeps heartbeating: audits find it out, its
/// chunks are copied elsewhere, it is suspended, and losing another peer loses nothing.
#[test]
fn a_peer_that_deletes_what_it_holds_is_caught_by_audits_and_replaced() {
    let mut net = quick_audit_net();
    let user = net.register("alice", "1G");
    let (src, mnt) = back_up_a_tree(&net, &user, 6);
    let stores = net.storage_dirs();
    let bad = busiest(&stores);
    let (partner, affected) = partner_of(&stores, bad);
    assert!(
        !affected.is_empty(),
        "the bad peer shares nothing with anyone"
    );
    let mut peers = net.peers.drain(..).collect::<Vec<Proc>>();

    fs::remove_dir_all(stores[bad].join("chunks")).unwrap();
    fs::create_dir_all(stores[bad].join("chunks")).unwrap();
    caught_replaced_and_survives(
        &net, &stores, &mut peers, &user, bad, partner, &affected, &src, &mnt,
    );
    let s = status(&net.home(&format!("peer-{bad}")));
    assert!(
        s.contains("standing suspended") || s.contains("standing disqualified"),
        "{s}"
    );
    // `/metrics` counts the audits by outcome and the peer's fall.
    let m = metric_lines(&net);
    let value = |name: &str| -> f64 {
        m.iter()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
    };
    assert!(value("peerstash_audits_total{outcome=\"missing\"}") >= 1.0);
    assert!(value("peerstash_audits_total{outcome=\"passed\"}") >= 1.0);
    assert!(
        value("peerstash_peers_suspended") + value("peerstash_peers_disqualified") >= 1.0,
        "{m:?}"
    );
}

/// The server's `/metrics` lines, from its metrics listener (plain HTTP, loopback).
fn metric_lines(net: &Net) -> Vec<String> {
    net.metrics().lines().map(str::to_string).collect()
}

/// A peer whose disk flips one byte in a few chunks: audits of those fail, they are
/// copied elsewhere, and losing their other holder loses nothing.
#[test]
fn a_peer_with_corrupt_chunks_is_caught_by_audits_and_they_are_replaced() {
    let mut net = quick_audit_net();
    let user = net.register("alice", "1G");
    let (src, mnt) = back_up_a_tree(&net, &user, 6);
    let stores = net.storage_dirs();
    let bad = busiest(&stores);
    let (partner, shared) = partner_of(&stores, bad);
    let affected: BTreeSet<String> = shared.into_iter().take(3).collect();
    assert!(
        !affected.is_empty(),
        "the bad peer shares nothing with anyone"
    );
    let mut peers = net.peers.drain(..).collect::<Vec<Proc>>();

    for c in &affected {
        let p = chunk_path(&stores[bad], c);
        let mut bytes = fs::read(&p).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x01;
        fs::write(&p, bytes).unwrap();
    }
    caught_replaced_and_survives(
        &net, &stores, &mut peers, &user, bad, partner, &affected, &src, &mnt,
    );
}

/// A peer that threw the bytes away but kept every chunk's BLAKE3 tree answers audits
/// with the right chaining values and made-up bytes (a test-only switch of debug builds,
/// `PEERSTASH_TEST_CHEAT=hashes-only`): audits fail, its chunks are replaced, and losing
/// another peer loses nothing.
#[test]
fn a_peer_that_keeps_only_hashes_is_caught_by_audits_and_replaced() {
    let mut net = quick_audit_net();
    let user = net.register("alice", "1G");
    let (src, mnt) = back_up_a_tree(&net, &user, 6);
    let stores = net.storage_dirs();
    let bad = busiest(&stores);
    let (partner, affected) = partner_of(&stores, bad);
    assert!(
        !affected.is_empty(),
        "the bad peer shares nothing with anyone"
    );
    let mut peers = net.peers.drain(..).collect::<Vec<Proc>>();

    // The bad peer restarts as a cheat: it still has its files (the hashes it computes
    // come from them), but answers with zeroed bytes and serves no reads.
    peers[bad].kill9();
    let mut cmd = Command::new(bin("peerstash"));
    cmd.arg("--home")
        .arg(net.home(&format!("peer-{bad}")))
        .arg("serve")
        .env("PEERSTASH_TEST_CHEAT", "hashes-only");
    peers[bad] = Proc::spawn("the bad peer cheating", cmd);
    caught_replaced_and_survives(
        &net, &stores, &mut peers, &user, bad, partner, &affected, &src, &mnt,
    );
}

/// Passed audits the server counts for the four daemons, from their own status.
fn audits_passed(net: &Net) -> usize {
    (0..4)
        .map(|i| {
            let s = status(&net.home(&format!("peer-{i}")));
            s.lines()
                .find_map(|l| l.strip_prefix("audits:"))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// `peerstash verify` reads every copy back: a copy corrupted on one holder is a bad copy
/// (reported; the server audits that location at once and replaces it), a chunk deleted
/// from both its holders is unreadable; it exits non-zero and names both. Once the
/// corrupt copy is replaced, only the lost chunk is left.
#[test]
fn verify_finds_a_corrupt_copy_and_a_missing_chunk_and_the_corrupt_copy_is_replaced() {
    // Audits every hour: only the first audit of each location (right after it is
    // stored) happens during the test, so verify, not a periodic audit, finds the damage.
    let net = Net::start_with(
        4,
        &[
            "--heartbeat-interval",
            "1",
            "--online-timeout",
            "3",
            "--repair-interval",
            "1",
            "--audit-interval",
            "3600",
        ],
    );
    let user = net.register("alice", "1G");
    back_up_a_tree(&net, &user, 2);
    let stores = net.storage_dirs();
    wait_for(
        "the first audit of every location",
        Duration::from_secs(240),
        || {
            let locations = metric_lines(&net)
                .iter()
                .find_map(|l| l.strip_prefix("peerstash_chunk_locations ")?.parse().ok())
                .unwrap_or(usize::MAX);
            (audits_passed(&net) >= locations).then_some(())
        },
    );
    let clean = peerstash_ok(&user, &["verify"]);
    assert!(clean.contains("0 bad copies"), "{clean}");

    let bad = busiest(&stores);
    let corrupt = chunks_on(&stores[bad])
        .into_iter()
        .next()
        .expect("a peer holds a chunk");
    let p = chunk_path(&stores[bad], &corrupt);
    let mut bytes = fs::read(&p).unwrap();
    bytes[0] ^= 0xff;
    fs::write(&p, bytes).unwrap();
    // Another chunk (small files are packed: there may be only a few chunks).
    let lost = stores
        .iter()
        .flat_map(|d| chunks_on(d))
        .find(|c| *c != corrupt)
        .expect("the peers hold another chunk");
    for d in &stores {
        if chunks_on(d).contains(&lost) {
            fs::remove_file(chunk_path(d, &lost)).unwrap();
        }
    }

    let out = Command::new(bin("peerstash"))
        .arg("--home")
        .arg(&user)
        .args(["verify", "--sample", "100"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "verify passed over damage: {stdout}");
    assert!(
        stdout.contains(&format!("bad copy: chunk {corrupt}")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("unreadable: chunk {lost}")),
        "{stdout}"
    );

    // The report makes the server audit the corrupt copy now; it fails and is replaced.
    wait_for(
        "the corrupt copy replaced",
        Duration::from_secs(120),
        || {
            let out = Command::new(bin("peerstash"))
                .arg("--home")
                .arg(&user)
                .arg("verify")
                .output()
                .unwrap();
            let s = String::from_utf8_lossy(&out.stdout).into_owned();
            (!s.contains(&format!("chunk {corrupt}"))
                && s.contains(&format!("unreadable: chunk {lost}")))
            .then_some(())
        },
    );
}

/// `peers` daemons heartbeating every second (offline after 3 s), every location audited
/// every `interval` seconds, and `extra` server flags.
fn audit_net(peers: usize, interval: &str, extra: &[&str]) -> Net {
    let mut args = vec![
        "--heartbeat-interval",
        "1",
        "--online-timeout",
        "3",
        "--audit-interval",
        interval,
    ];
    args.extend_from_slice(extra);
    Net::start_with(peers, &args)
}

/// CPU seconds the process `pid` has used (user + system).
fn cpu_secs(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// The sum of every series of `name` in `/metrics`.
fn metric_sum(net: &Net, name: &str) -> f64 {
    metric_lines(net)
        .iter()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Audit load on a live server, measured rather than asserted: the server's CPU over
/// 20 s of an idle network holding a backed-up tree, with audits off (the baseline:
/// heartbeats, status checks, repair scans) and with every location audited every 2 s;
/// the difference per audit, and what that makes per audited TiB a day at the default
/// interval. Run with `cargo test --test repair audit_load -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement: run it with --ignored --nocapture"]
fn audit_load_on_a_live_server() {
    let mut cpu = Vec::new();
    for interval in ["0", "2"] {
        let net = audit_net(4, interval, &[]);
        let user = net.register("alice", "1G");
        back_up_a_tree(&net, &user, 6);
        std::thread::sleep(Duration::from_secs(10));
        let pid = net._server.pid();
        let (c0, a0, b0) = (
            cpu_secs(pid),
            metric_sum(&net, "peerstash_audits_total"),
            metric_sum(&net, "peerstash_audit_answer_bytes_total"),
        );
        std::thread::sleep(Duration::from_secs(20));
        let (c1, a1, b1) = (
            cpu_secs(pid),
            metric_sum(&net, "peerstash_audits_total"),
            metric_sum(&net, "peerstash_audit_answer_bytes_total"),
        );
        let verify = metric_sum(&net, "peerstash_audit_verify_seconds_total");
        let locations = metric_sum(&net, "peerstash_chunk_locations ");
        eprintln!(
            "audit interval {interval:>2} s: {locations} locations, server CPU {:.2} s in 20 s, \
             {} audits, {:.0} answer bytes per audit, {verify:.4} s verifying in all",
            c1 - c0,
            a1 - a0,
            if a1 > a0 { (b1 - b0) / (a1 - a0) } else { 0.0 }
        );
        cpu.push((c1 - c0, a1 - a0));
    }
    let per_audit = (cpu[1].0 - cpu[0].0) / cpu[1].1.max(1.0);
    let per_tib_day = (1u64 << 20) as f64 * 4.0;
    eprintln!(
        "server CPU per audit (over the baseline): {:.0} µs; per audited TiB a day at the \
         default 6 h interval (1 MiB chunks, {per_tib_day} audits): {:.0} s",
        per_audit * 1e6,
        per_audit * per_tib_day
    );
}

/// The exact quota `peerstash status` reports ("… bytes of N)").
fn quota_of(home: &Path) -> u64 {
    let s = status(home);
    let line = s.lines().find(|l| l.starts_with("quota:")).unwrap();
    let n = line.rsplit("bytes of ").next().unwrap();
    n.trim_end_matches(')').parse().unwrap()
}

/// Bytes of the chunk files a daemon's storage directory holds.
fn chunk_bytes_on(storage: &Path) -> u64 {
    chunks_on(storage)
        .iter()
        .map(|c| fs::metadata(chunk_path(storage, c)).unwrap().len())
        .sum()
}

/// The storage exchange is counted on audited bytes, not on the `--lend` promise: a user
/// lending 1G who holds nothing for others may store only the server's starting grace,
/// and a storage daemon's quota grows by exactly what it holds, audited, divided by 1.5.
#[test]
fn the_quota_follows_audited_holdings_not_the_lent_figure() {
    const GRACE: u64 = 2 << 20;
    let net = audit_net(3, "2", &["--quota-grace", "2M"]);
    let user = net.register("alice", "1G");
    assert_eq!(quota_of(&user), GRACE, "{}", status(&user));

    let mnt = net.dir.path().join("mnt");
    let m = Mount::start(&user, &mnt);
    // 2 MiB at two replicas would fit 1G / 1.5, not the grace.
    let err = fs::write(mnt.join("big.bin"), vec![3u8; 2 << 20])
        .and_then(|_| fs::File::open(mnt.join("big.bin"))?.sync_all())
        .expect_err("2 MiB at two replicas must not fit a 2 MiB starting quota");
    assert_eq!(err.raw_os_error(), Some(28), "{err}");
    fs::remove_file(mnt.join("big.bin")).unwrap();
    // 300 KB at two replicas fits.
    fs::write(mnt.join("small.bin"), common::bytes(7, 300_000)).unwrap();
    fs::File::open(mnt.join("small.bin"))
        .unwrap()
        .sync_all()
        .unwrap();
    m.stop();

    // Every daemon's quota: the grace plus its chunk bytes on disk (each chunk once
    // audited) / 1.5. Recounted on each poll: releases may still delete a chunk.
    let stores = net.storage_dirs();
    let mut held_any = false;
    for (i, storage) in stores.iter().enumerate() {
        let home = net.home(&format!("peer-{i}"));
        let (quota, held) = wait_for(
            "the holders' audits to pass and earn them quota",
            Duration::from_secs(60),
            || {
                let held = chunk_bytes_on(storage);
                let quota = quota_of(&home);
                (quota == GRACE + (held as f64 / 1.5).floor() as u64).then_some((quota, held))
            },
        );
        if held > 0 {
            held_any = true;
            assert!(quota > GRACE);
            assert!(status(&home).contains("audited"), "{}", status(&home));
        }
    }
    assert!(held_any, "nobody holds alice's file");
    // Alice herself holds nothing for others: still the grace.
    assert_eq!(quota_of(&user), GRACE, "{}", status(&user));
}
