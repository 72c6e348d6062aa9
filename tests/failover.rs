//! Clients fail over between several server URLs. The first test puts two plain TCP
//! relays on loopback ports in front of one real `peerstash-server` (TLS passes through
//! them untouched, so one pinned fingerprint holds for both), and the clients get both
//! URLs; killing a relay is a dead instance. The second runs two real instances on one
//! database and kills one with -9. What a user sees: registering and logging in with the
//! first URL dead works, a copy into the mounted drive completes and becomes durable while
//! the instance it uses dies, every file reads back after a remount, and the storage
//! daemon keeps heartbeating. `postgres::NAME` runs the first two with the server on a
//! PostgreSQL database (a cluster of the test's own) instead of its SQLite file.

mod common;

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::net::*;
use common::postgres::PgCluster;
use common::relay::Relay;
use common::{bin, bytes, free_tcp_port, free_udp_port, wait_for, Proc};
use peerstash::client::Home;
use peerstash::peer::rendezvous::RendezvousConfig;
use peerstash::peer::{PeerAddr, PeerClient, Via};

/// A peer with no heartbeat for this long counts as offline (the server is told so, and
/// asks for a heartbeat every 2 s).
const ONLINE_TIMEOUT_SECS: u64 = 12;
/// Files the copy writes; the instance dies once a third of them are in.
const FILES: usize = 450;

fn server_addr(net: &Net) -> SocketAddr {
    net.url
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .parse()
        .unwrap()
}

/// `peerstash register` (or `login`) with `servers` as the `--server` arguments.
fn account(net: &Net, verb: &str, name: &str, home: &Path, servers: &[String]) -> String {
    let mut cmd = Command::new(bin("peerstash"));
    cmd.arg("--home").arg(home).arg(verb);
    for s in servers {
        cmd.args(["--server", s]);
    }
    cmd.args(["--server-fingerprint", &net.fingerprint, "--name", name])
        .arg("--password-file")
        .arg(&net.password);
    if verb == "register" {
        cmd.args(["--lend", "1G"])
            .arg("--storage-dir")
            .arg(home.join("storage"))
            .args(["--listen", &format!("127.0.0.1:{}", free_udp_port())]);
    }
    run(&mut cmd)
}

/// The server URLs a home's config keeps, in order.
fn configured_urls(home: &Path) -> Vec<String> {
    let text = fs::read_to_string(home.join("config.toml")).unwrap();
    let cfg: toml::Table = text.parse().unwrap();
    cfg["server_urls"]
        .as_array()
        .unwrap_or_else(|| panic!("no server_urls list in {text}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

fn file_of(i: usize) -> (PathBuf, Vec<u8>) {
    // Mostly small files (packed), every 40th one spanning several chunks.
    let len = if i % 40 == 0 {
        (3 << 20) + i
    } else {
        1 + (i * 997) % (48 << 10)
    };
    (
        PathBuf::from(format!("d{}/f{i}.bin", i % 9)),
        bytes(i as u64, len),
    )
}

/// Start copying `files` files into `mnt` on a thread of its own; return once a third of
/// them are in (the moment to kill something), with the thread to join.
fn copy_until_a_third(mnt: &Path, files: usize) -> std::thread::JoinHandle<()> {
    let written = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (mnt, written) = (mnt.to_path_buf(), written.clone());
        std::thread::spawn(move || {
            for i in 0..files {
                let (p, data) = file_of(i);
                let p = mnt.join(p);
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                fs::write(&p, &data).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                written.store(i + 1, Ordering::SeqCst);
            }
        })
    };
    wait_for("a third of the copy", Duration::from_secs(300), || {
        (written.load(Ordering::SeqCst) >= files / 3).then_some(())
    });
    writer
}

/// Every one of the first `files` files reads back from `mnt` byte for byte.
fn reads_back(mnt: &Path, files: usize) {
    for i in 0..files {
        let (p, data) = file_of(i);
        let got = fs::read(mnt.join(&p)).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(got == data, "{} differs after the remount", p.display());
    }
}

/// The server's arguments in these tests: quick heartbeats, and `database` (`--database`
/// and its value, or nothing for the data directory's own SQLite file).
fn server_args<'a>(online_timeout: &'a str, database: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--heartbeat-interval",
        "2",
        "--online-timeout",
        online_timeout,
    ];
    args.extend_from_slice(database);
    args
}

#[test]
fn clients_fail_over_to_the_next_server_url() {
    clients_fail_over(&[]);
}

/// [`clients_fail_over_to_the_next_server_url`] on `database` (see [`server_args`]).
fn clients_fail_over(database: &[&str]) {
    let timeout = ONLINE_TIMEOUT_SECS.to_string();
    let net = Net::start_with(3, &server_args(&timeout, database));
    let server = server_addr(&net);
    let dead = format!("https://127.0.0.1:{}", free_tcp_port());
    let mut a = Relay::start(server);
    let b = Relay::start(server);

    // (1) The first URL is dead (nothing listens): register and login move on to the
    // next. Repeated --server flags and a comma-separated list both work.
    let user = net.home("alice");
    let out = account(
        &net,
        "register",
        "alice",
        &user,
        &[dead.clone(), format!("{},{}", a.url(), b.url())],
    );
    assert!(out.contains("registered alice"), "{out}");
    assert_eq!(configured_urls(&user), [dead.clone(), a.url(), b.url()]);
    let again = net.home("alice-again");
    let out = account(&net, "login", "alice", &again, &[dead.clone(), b.url()]);
    assert!(out.contains("logged in as alice"), "{out}");
    assert_eq!(configured_urls(&again), [dead.clone(), b.url()]);
    let st = peerstash_ok(&user, &["status"]);
    assert!(
        st.contains(&format!(
            "server:   {dead}, {} (in use), {}",
            a.url(),
            b.url()
        )),
        "{st}"
    );

    // (3) A storage daemon behind its own pair of relays, so that what reaches the second
    // one is the daemon's.
    let mut c = Relay::start(server);
    let e = Relay::start(server);
    let lender = net.home("lender");
    account(&net, "register", "lender", &lender, &[c.url(), e.url()]);
    let mut cmd = Command::new(bin("peerstash"));
    cmd.arg("--home").arg(&lender).arg("serve");
    let mut serve = Proc::spawn("lender", cmd);
    wait_for("the lender online", Duration::from_secs(60), || {
        peerstash_ok(&user, &["status"])
            .contains("4 online")
            .then_some(())
    });
    assert!(c.accepted() > 0 && e.accepted() == 0, "the daemon uses c");

    // (2) A copy into the mount; the instance the mount uses dies a third of the way in,
    // cutting every connection it carries (and the daemon's instance with it).
    let mnt = net.dir.path().join("mnt");
    let m = Mount::start(&user, &mnt);
    assert!(a.accepted() > 0, "the mount settled on the first live URL");
    let writer = copy_until_a_third(&mnt, FILES);
    a.kill();
    c.kill();
    let killed = Instant::now();
    writer.join().expect("the copy completes");

    // Everything becomes durable through the second URL.
    let waited = peerstash_ok(&user, &["status", "--wait", "--wait-limit", "120"]);
    assert!(
        waited.contains("every file is confirmed on peers"),
        "{waited}"
    );
    let st = peerstash_ok(&user, &["status"]);
    assert!(st.contains("pending:  0 uploads"), "{st}");
    assert!(st.contains(&format!("{} (in use)", b.url())), "{st}");
    assert!(b.accepted() > 0);

    // (3) The daemon kept heartbeating through e: still online well past the online
    // timeout after c died, and e keeps carrying answers to it.
    let carried = e.answered();
    assert!(carried > 0, "the daemon moved to e");
    let past = Duration::from_secs(ONLINE_TIMEOUT_SECS + 3);
    if let Some(rest) = past.checked_sub(killed.elapsed()) {
        std::thread::sleep(rest);
    }
    wait_for("a heartbeat through e", Duration::from_secs(60), || {
        (e.answered() > carried).then_some(())
    });
    let st = peerstash_ok(&user, &["status"]);
    assert!(st.contains("4 online"), "{st}");

    // Every file reads back after a remount (which finds the live URL by itself).
    m.stop();
    let m = Mount::start(&user, &mnt);
    reads_back(&mnt, FILES);
    m.stop();
    serve.terminate(Duration::from_secs(10));
}

/// Two real server instances on one database (one data directory): the instance the
/// drive talks to is killed (-9) in the middle of a copy; the copy completes and becomes
/// durable through the other, and every file reads back after a remount.
#[test]
fn a_copy_survives_the_kill_of_its_server_instance() {
    a_copy_survives_the_kill(&[]);
}

/// [`a_copy_survives_the_kill_of_its_server_instance`] on `database` (see
/// [`server_args`]); the second instance gets the same arguments, so the same database.
fn a_copy_survives_the_kill(database: &[&str]) {
    let timeout = ONLINE_TIMEOUT_SECS.to_string();
    let net = Net::start_with(3, &server_args(&timeout, database));
    let mut second = net.second_instance();
    let url = second.url.clone();
    // A storage daemon that knows the second instance first.
    let lender = net.home("lender");
    account(
        &net,
        "register",
        "lender",
        &lender,
        &[url.clone(), net.url.clone()],
    );
    let mut cmd = Command::new(bin("peerstash"));
    cmd.arg("--home").arg(&lender).arg("serve");
    let mut serve = Proc::spawn("lender", cmd);
    let user = net.home("alice");
    let out = account(
        &net,
        "register",
        "alice",
        &user,
        &[url.clone(), net.url.clone()],
    );
    assert!(out.contains("registered alice"), "{out}");
    let st = peerstash_ok(&user, &["status"]);
    assert!(st.contains(&format!("{url} (in use)")), "{st}");

    let files = FILES / 3;
    let mnt = net.dir.path().join("mnt");
    let m = Mount::start(&user, &mnt);
    let writer = copy_until_a_third(&mnt, files);
    // The lender's rendezvous (hello connection) is on both instances, so nothing has to
    // move when one dies.
    wait_for(
        "the lender's hello on both",
        Duration::from_secs(60),
        || {
            (hello_connections(&net.metrics()) == 4 && hello_connections(&second.metrics()) == 1)
                .then_some(())
        },
    );
    second.proc.kill9();
    writer.join().expect("the copy completes");
    assert_eq!(hello_connections(&net.metrics()), 4);
    let waited = peerstash_ok(&user, &["status", "--wait", "--wait-limit", "120"]);
    assert!(
        waited.contains("every file is confirmed on peers"),
        "{waited}"
    );
    let st = peerstash_ok(&user, &["status"]);
    assert!(st.contains(&format!("{} (in use)", net.url)), "{st}");

    m.stop();
    let m = Mount::start(&user, &mnt);
    reads_back(&mnt, files);
    m.stop();
    serve.terminate(Duration::from_secs(10));
}

/// How many daemons hold a rendezvous (hello) connection to an instance, from its
/// `/metrics` text.
fn hello_connections(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("peerstash_peers_reachable{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// A storage daemon keeps a rendezvous (hello) connection to every instance it knows. A
/// daemon behind NAT is reached only through a rendezvous that has its hello, and a client
/// asks the instance it uses first: while both instances live, a client of either reaches
/// the daemon (here through the relay, the path a daemon behind a symmetric NAT needs; the
/// connection pins the daemon's certificate, so it really got there). A daemon that knows
/// only one instance is found by a client that uses the other: the client asks the
/// instances it knows in turn.
#[test]
fn a_daemon_is_reached_through_the_rendezvous_of_either_live_instance() {
    let net = Net::start(1);
    let second = net.second_instance();
    let both = [second.url.clone(), net.url.clone()];
    let lender = net.home("lender");
    account(&net, "register", "lender", &lender, &both);
    // One that knows only the second instance (say, registered before the first existed).
    let narrow = net.home("narrow");
    account(&net, "register", "narrow", &narrow, &both[..1]);
    let mut serving = Vec::new();
    for (name, home) in [("lender", &lender), ("narrow", &narrow)] {
        let mut cmd = Command::new(bin("peerstash"));
        cmd.arg("--home").arg(home).arg("serve");
        serving.push(Proc::spawn(name, cmd));
    }
    wait_for("the hellos", Duration::from_secs(60), || {
        (hello_connections(&net.metrics()) == 2 && hello_connections(&second.metrics()) == 2)
            .then_some(())
    });

    let relayed = |home: &Path| {
        let h = Home::new(home);
        let cfg = h.load_config().unwrap();
        PeerAddr {
            addr: cfg.listen_addr.parse().unwrap(),
            fingerprint: h.load_peer_cert().unwrap().unwrap().fingerprint(),
            via: Via::Relay(cfg.peer_id),
        }
    };
    let user = Home::new(net.register("alice", "1M"));
    let alice = user.load_config().unwrap();
    let key = user.load_transaction_key().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reach = |first: &str, others: &[&str], home: &Path| {
        let rv =
            RendezvousConfig::from_url(first, alice.server_fingerprint, alice.peer_id, key.clone())
                .unwrap()
                .with_others(others.iter().copied());
        let target = relayed(home);
        rt.block_on(async {
            let client = PeerClient::new().unwrap().with_rendezvous(rv);
            let r = client.open_raw(&target).await.map(|_| ());
            client.close();
            r
        })
    };
    for (first, other) in [(&net.url, &second.url), (&second.url, &net.url)] {
        reach(first, &[other], &lender)
            .unwrap_or_else(|e| panic!("reaching the lender through {first}: {e}"));
        reach(first, &[other], &narrow)
            .unwrap_or_else(|e| panic!("reaching the narrow lender from {first}: {e}"));
    }
    // A dead instance listed before the one that knows the daemon is passed over.
    let dead = format!("https://127.0.0.1:{}", free_tcp_port());
    reach(&net.url, &[&dead, &second.url], &narrow)
        .unwrap_or_else(|e| panic!("reaching the narrow lender past a dead instance: {e}"));
    for m in [net.metrics(), second.metrics()] {
        assert!(
            m.lines()
                .any(|l| l.starts_with("peerstash_rendezvous_total{")
                    && l.contains("kind=\"relay\"")
                    && l.contains("outcome=\"ok\"")
                    && !l.ends_with(" 0")),
            "no relay session opened:\n{m}"
        );
    }
    for mut p in serving {
        p.terminate(Duration::from_secs(10));
    }
}

/// [`clients_fail_over_to_the_next_server_url`] and
/// [`a_copy_survives_the_kill_of_its_server_instance`] with the server on PostgreSQL:
/// every instance is given the same database by URL, on a cluster of the test's own that
/// outlives the test's processes (it is dropped last).
mod postgres {
    use super::*;

    #[test]
    fn clients_fail_over_to_the_next_server_url() {
        let pg = PgCluster::start();
        let url = pg.create_database("peerstash");
        super::clients_fail_over(&["--database", &url]);
    }

    #[test]
    fn a_copy_survives_the_kill_of_its_server_instance() {
        let pg = PgCluster::start();
        let url = pg.create_database("peerstash");
        super::a_copy_survives_the_kill(&["--database", &url]);
    }
}
