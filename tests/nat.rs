//! Peers behind NAT, with real processes in Linux network namespaces the test makes
//! itself: a bridge for the internet, iptables MASQUERADE routers, documentation
//! addresses that exist only inside the namespaces. Also the attacks on the rendezvous
//! and the relay, against a live server on loopback.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::net::{diff, is_mounted, make_tree, run};
use common::{bin, wait_for, Proc};
use peerstash::client::{Home, ServerClient};
use peerstash::control::{ControlSigner, Direction, MessageKind};
use peerstash::peer::rendezvous::{self as rv, op, NatError, Status};
use peerstash::peer::{PeerAddr, PeerClient, PeerError, Via};
use peerstash::Fingerprint;

/// Whether `tool` is on the PATH.
fn installed(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Why the namespaced test cannot run here, if it cannot.
fn cannot_make_namespaces() -> Option<String> {
    let uid = run(Command::new("id").arg("-u"));
    if uid.trim() != "0" {
        return Some("not root: network namespaces and iptables need root".into());
    }
    for tool in ["ip", "iptables", "nsenter", "fusermount3"] {
        if !installed(tool) {
            return Some(format!("{tool} is not installed (.ci/run installs it)"));
        }
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("no /dev/fuse".into());
    }
    None
}

/// Network namespaces (and, inside them, interfaces and iptables rules) deleted on drop.
struct Topology {
    tag: String,
    made: Vec<String>,
}

fn sh(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// What kind of router stands in front of a home.
#[derive(Clone, Copy, PartialEq)]
enum Nat {
    /// Port-preserving MASQUERADE: one public port per socket (hole punching works).
    Cone,
    /// `--random-fully`: a new random public port per destination (only a relay works).
    Symmetric,
}

impl Topology {
    /// A topology whose names carry this process and `test` (tests run in parallel).
    fn new(test: &str) -> Topology {
        Topology {
            tag: format!("psnt{}{test}", std::process::id()),
            made: Vec::new(),
        }
    }

    fn name(&self, ns: &str) -> String {
        format!("{}-{ns}", self.tag)
    }

    fn path(&self, ns: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(self.name(ns))
    }

    fn add(&mut self, ns: &str) -> Result<(), String> {
        sh(Command::new("ip").args(["netns", "add", &self.name(ns)]))?;
        self.made.push(self.name(ns));
        sh(&mut self.ip(ns, &["link", "set", "lo", "up"]))
    }

    fn ip(&self, ns: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["-n", &self.name(ns)]).args(args);
        c
    }

    /// `program` run inside namespace `ns` (nsenter execs it: the child is the program).
    fn cmd(&self, ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path(ns).display()))
            .arg(program);
        c
    }

    /// Connect `ns` to the internet bridge as `addr`/24 on its `wan0`.
    fn attach(&mut self, ns: &str, addr: &str) -> Result<(), String> {
        self.add(ns)?;
        let v = format!("v-{ns}");
        sh(Command::new("ip").args([
            "link",
            "add",
            "wan0",
            "netns",
            &self.name(ns),
            "type",
            "veth",
            "peer",
            "name",
            &v,
            "netns",
            &self.name("inet"),
        ]))?;
        sh(&mut self.ip("inet", &["link", "set", &v, "master", "br0", "up"]))?;
        sh(&mut self.ip(ns, &["addr", "add", &format!("{addr}/24"), "dev", "wan0"]))?;
        sh(&mut self.ip(ns, &["link", "set", "wan0", "up"]))
    }

    /// Home `n` (1..=4): router `rN` at 203.0.113.(10+n) outside, host `hN` at
    /// 198.51.100.(64(n-1)+2) inside.
    fn home(&mut self, n: u8, nat: Nat) -> Result<String, String> {
        self.home_at(n, nat, &format!("203.0.113.{}", 10 + n))
    }

    /// Home `n` with its router at `wan` outside.
    fn home_at(&mut self, n: u8, nat: Nat, wan: &str) -> Result<String, String> {
        let (r, h) = (format!("r{n}"), format!("h{n}"));
        let base = 64 * (n as u32 - 1);
        self.attach(&r, wan)?;
        self.add(&h)?;
        sh(Command::new("ip").args([
            "link",
            "add",
            "lan0",
            "netns",
            &self.name(&r),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &self.name(&h),
        ]))?;
        let gw = format!("198.51.100.{}", base + 1);
        let me = format!("198.51.100.{}", base + 2);
        sh(&mut self.ip(&r, &["addr", "add", &format!("{gw}/26"), "dev", "lan0"]))?;
        sh(&mut self.ip(&r, &["link", "set", "lan0", "up"]))?;
        sh(&mut self.ip(&h, &["addr", "add", &format!("{me}/26"), "dev", "eth0"]))?;
        sh(&mut self.ip(&h, &["link", "set", "eth0", "up"]))?;
        sh(&mut self.ip(&h, &["route", "add", "default", "via", &gw]))?;
        sh(self
            .cmd(&r, "sysctl")
            .args(["-qw", "net.ipv4.ip_forward=1"]))?;
        let mut masq = self.cmd(&r, "iptables");
        masq.args([
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            "wan0",
            "-j",
            "MASQUERADE",
        ]);
        if nat == Nat::Symmetric {
            masq.arg("--random-fully");
        }
        sh(&mut masq)?;
        // A home router lets nothing unsolicited in (and so never records it in its
        // connection table, where it would make the router pick another port later).
        sh(self.cmd(&r, "iptables").args([
            "-A",
            "INPUT",
            "-i",
            "wan0",
            "-m",
            "conntrack",
            "--ctstate",
            "NEW",
            "-j",
            "DROP",
        ]))?;
        Ok(me)
    }

    /// The internet: a bridge in namespace `inet` that the others attach to.
    fn internet(&mut self) -> Result<(), String> {
        self.add("inet")?;
        sh(&mut self.ip("inet", &["link", "add", "br0", "type", "bridge"]))?;
        sh(&mut self.ip("inet", &["link", "set", "br0", "up"]))
    }

    /// The topology of the router-software test: the server, homes 1 to 3 behind
    /// routers that run miniupnpd, the user in home 4 behind a plain cone NAT.
    /// miniupnpd will not serve behind an outside address in a reserved range (the
    /// documentation ranges included), so those three routers take 192.0.1.11-13: like
    /// every address here, they exist only on this test's bridge, in namespaces with no
    /// way out.
    fn build_igd(&mut self) -> Result<[String; 4], String> {
        self.internet()?;
        self.attach("srv", "203.0.113.1")?;
        let homes = [
            self.home_at(1, Nat::Cone, "192.0.1.11")?,
            self.home_at(2, Nat::Cone, "192.0.1.12")?,
            self.home_at(3, Nat::Cone, "192.0.1.13")?,
            self.home(4, Nat::Cone)?,
        ];
        // Both ranges share the bridge: each side reaches the other on-link.
        for ns in ["srv", "r4"] {
            sh(&mut self.ip(ns, &["route", "add", "192.0.1.0/24", "dev", "wan0"]))?;
        }
        for ns in ["r1", "r2", "r3"] {
            sh(&mut self.ip(ns, &["route", "add", "203.0.113.0/24", "dev", "wan0"]))?;
        }
        Ok(homes)
    }

    /// The whole topology of the issue: server and public peer on the internet, homes 1
    /// and 2 behind cone NATs, home 3 behind a symmetric NAT, the user in home 4.
    fn build(&mut self) -> Result<[String; 4], String> {
        self.internet()?;
        self.attach("srv", "203.0.113.1")?;
        self.attach("pub", "203.0.113.2")?;
        Ok([
            self.home(1, Nat::Cone)?,
            self.home(2, Nat::Cone)?,
            self.home(3, Nat::Symmetric)?,
            self.home(4, Nat::Cone)?,
        ])
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Deleting a namespace takes its interfaces and iptables rules with it.
        for n in self.made.iter().rev() {
            let _ = Command::new("ip").args(["netns", "delete", n]).status();
        }
    }
}

/// The NAT-PMP service of a home router: answers the external-address and map-UDP
/// requests of hosts on its LAN (for their own address only) and installs a real DNAT
/// rule in the router for each mapping. It stands in for the router's own daemon:
/// miniupnpd (Debian's, 2.3.1) refuses to serve when its outside address is in a
/// documentation range, which is all this test may use.
struct NatPmp {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NatPmp {
    fn start(top: &Topology, router: &str, lan: &str, wan: [u8; 4]) -> NatPmp {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (path, lan) = (top.path(router), lan.to_string());
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let ns = fs::File::open(&path).unwrap();
            assert_eq!(
                unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            let sock = std::net::UdpSocket::bind((lan.as_str(), 5351)).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let mut buf = [0u8; 64];
            let epoch = [0, 0, 0, 1];
            while !stopped.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                match buf[..n] {
                    [0, 0] => {
                        let mut a = vec![0, 128, 0, 0];
                        a.extend_from_slice(&epoch);
                        a.extend_from_slice(&wan);
                        let _ = sock.send_to(&a, from);
                    }
                    [0, 1, 0, 0, p0, p1, _, _, l0, l1, l2, l3] => {
                        let port = u16::from_be_bytes([p0, p1]);
                        // The child inherits this thread's network namespace.
                        let ok = Command::new("iptables")
                            .args(["-t", "nat", "-I", "PREROUTING", "-i", "wan0"])
                            .args(["-p", "udp", "--dport", &port.to_string()])
                            .args(["-j", "DNAT", "--to-destination"])
                            .arg(format!("{}:{port}", from.ip()))
                            .status()
                            .is_ok_and(|s| s.success());
                        let mut a = vec![0, 129, 0, if ok { 0 } else { 3 }];
                        a.extend_from_slice(&epoch);
                        a.extend_from_slice(&[p0, p1, p0, p1, l0, l1, l2, l3]);
                        let _ = sock.send_to(&a, from);
                    }
                    _ => {}
                }
            }
        });
        NatPmp {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for NatPmp {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Run `f` on a thread that lives in the network namespace at `path`.
fn in_netns<T: Send + 'static>(path: PathBuf, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        let ns = fs::File::open(&path).unwrap();
        // setns changes only this thread's namespace.
        let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {}", path.display());
        f()
    })
    .join()
    .unwrap()
}

/// One Prometheus counter's value (0 when absent).
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

struct Server {
    proc: Proc,
    url: String,
    fingerprint: String,
}

/// Start `peerstash-server` with `cmd` (already given its namespace, if any) and read
/// its start-up lines.
fn start_server(mut cmd: Command, dir: &Path, listen: &str) -> Server {
    cmd.arg("--data-dir")
        .arg(dir.join("server"))
        .args(["--listen", listen, "--open-registration"])
        // Read from inside the server's namespace, on the address the peers use.
        .arg("--public-metrics")
        .stdout(Stdio::piped());
    let mut proc = Proc::spawn("server", cmd);
    let out = proc.child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut fingerprint, mut url, mut rendezvous) = (String::new(), String::new(), false);
    while fingerprint.is_empty() || url.is_empty() || !rendezvous {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("server start-up lines");
        if let Some(f) = line.strip_prefix("fingerprint: ") {
            fingerprint = f.trim().to_string();
        } else if let Some(u) = line.strip_prefix("listening: ") {
            url = u.trim().to_string();
        } else if line.starts_with("rendezvous: udp ") {
            rendezvous = true;
        }
    }
    Server {
        proc,
        url,
        fingerprint,
    }
}

fn register(mut cmd: Command, server: &Server, home: &Path, name: &str, listen: &str) {
    let password = home.with_extension("password");
    fs::write(&password, "correct horse battery staple\n").unwrap();
    run(cmd
        .arg("--home")
        .arg(home)
        .arg("register")
        .args(["--server", &server.url])
        .args(["--server-fingerprint", &server.fingerprint])
        .args(["--name", name, "--lend", "1G", "--listen", listen])
        .arg("--password-file")
        .arg(&password)
        .arg("--storage-dir")
        .arg(home.join("storage")));
}

/// The names of the chunk files under a storage directory.
fn chunk_files(dir: &Path) -> std::collections::BTreeSet<String> {
    let out = run(Command::new("find")
        .arg(dir)
        .args(["-type", "f", "-printf", "%f\\n"]));
    out.lines().map(str::to_string).collect()
}

#[test]
fn peers_behind_nat_store_and_read_back_through_punching_and_the_relay() {
    if let Some(why) = cannot_make_namespaces() {
        eprintln!("SKIPPED: peers behind NAT need network namespaces here: {why}");
        return;
    }
    let mut top = Topology::new("a");
    let hosts = match top.build() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("SKIPPED: cannot build the namespaced network: {e}");
            return;
        }
    };
    // Home 2's router maps ports on request (NAT-PMP).
    let _natpmp = NatPmp::start(&top, "r2", "198.51.100.65", [203, 0, 113, 12]);
    let dir = tempfile::tempdir().unwrap();
    // Quick repairs: a peer silent for 3 s is offline, for 4 s more lost.
    let mut server_cmd = top.cmd("srv", bin("peerstash-server"));
    server_cmd.args(["--heartbeat-interval", "1", "--online-timeout", "3"]);
    server_cmd.args(["--repair-grace", "4", "--repair-interval", "1"]);
    let server = start_server(server_cmd, dir.path(), "203.0.113.1:7400");
    // The public peer on the internet; three peers each behind its own router.
    let peers = [
        ("pub", "public-peer", "203.0.113.2:7401".to_string()),
        ("h1", "home-1", format!("{}:7401", hosts[0])),
        ("h2", "home-2", format!("{}:7401", hosts[1])),
        ("h3", "home-3", format!("{}:7401", hosts[2])),
    ];
    let mut daemons = Vec::new();
    for (ns, name, listen) in &peers {
        let home = dir.path().join(name);
        register(top.cmd(ns, bin("peerstash")), &server, &home, name, listen);
        let mut serve = top.cmd(ns, bin("peerstash"));
        serve.arg("--home").arg(&home).arg("serve");
        daemons.push(Proc::spawn(name, serve));
    }
    let user = dir.path().join("user");
    register(
        top.cmd("h4", bin("peerstash")),
        &server,
        &user,
        "user",
        &format!("{}:7401", hosts[3]),
    );

    // Each daemon learns how it is reached; `status` says so.
    let expected = [
        "public (others connect straight to 203.0.113.2:7401)",
        "hole-punched only (behind NAT, public side 203.0.113.11:7401",
        "mapped (NAT-PMP; the router forwards a port; others connect straight to 203.0.113.12:7401)",
        "relayed (behind a symmetric NAT, public side 203.0.113.13:",
    ];
    for ((ns, name, _), want) in peers.iter().zip(expected) {
        let home = dir.path().join(name);
        let start = std::time::Instant::now();
        loop {
            let out = run(top
                .cmd(ns, bin("peerstash"))
                .arg("--home")
                .arg(&home)
                .arg("status"));
            let line = out.lines().find(|l| l.starts_with("reach:")).unwrap_or("");
            if line.contains(want) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{name}: {line:?}, expected {want:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    // The user behind the fourth NAT mounts the drive and copies a tree in.
    let src = dir.path().join("src");
    make_tree(&src, 6);
    let mnt = dir.path().join("mnt");
    let mount = |log: &str| {
        fs::create_dir_all(&mnt).unwrap();
        let mut cmd = top.cmd("h4", bin("peerstash"));
        cmd.arg("--home").arg(&user).arg("mount").arg(&mnt);
        // The client logs how it reached each peer behind NAT (checked below).
        cmd.env("RUST_LOG", "warn,peerstash::peer::client=debug");
        cmd.stderr(fs::File::create(dir.path().join(log)).unwrap());
        let mut m = Proc::spawn("mount", cmd);
        wait_for("the mount", Duration::from_secs(30), || {
            if let Ok(Some(s)) = m.child.try_wait() {
                panic!("peerstash mount exited early: {s}");
            }
            is_mounted(&mnt).then_some(())
        });
        m
    };
    let unmount = |m: &mut Proc| {
        m.terminate(Duration::from_secs(20));
        if is_mounted(&mnt) {
            let _ = Command::new("fusermount3").arg("-uz").arg(&mnt).status();
            panic!("still mounted after SIGTERM");
        }
    };
    let mut m = mount("mount-1.log");
    run(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", src.display()))
        .arg(&mnt));
    run(top
        .cmd("h4", bin("peerstash"))
        .arg("--home")
        .arg(&user)
        .args(["status", "--wait", "--wait-limit", "120"]));

    // It landed on the peers behind NAT, the symmetric one included.
    let held: Vec<_> = peers
        .iter()
        .map(|(_, name, _)| chunk_files(&dir.path().join(name).join("storage")))
        .collect();
    for ((_, name, _), h) in peers.iter().zip(&held).skip(1) {
        assert!(!h.is_empty(), "{name} holds no chunk");
    }
    // Chunks whose only copy besides the public peer's is behind the symmetric NAT: once
    // the public peer is gone, only the relay reaches them.
    let relay_only = held[3]
        .iter()
        .filter(|c| held[0].contains(*c) && !held[1].contains(*c) && !held[2].contains(*c))
        .count();
    let metrics = || server_metrics(&top, &server);
    let m1 = metrics();
    let relayed = metric(&m1, "peerstash_relay_bytes_total");
    assert!(relayed > 0, "nothing went through the relay:\n{m1}");
    assert!(
        metric(
            &m1,
            "peerstash_rendezvous_total{kind=\"punch\",outcome=\"ok\"}"
        ) > 0
    );
    for r in ["public", "mapped", "punch", "relay"] {
        let n = metric(&m1, &format!("peerstash_peers_reachable{{reach=\"{r}\"}}"));
        assert_eq!(n, 1, "{r}:\n{m1}");
    }
    unmount(&mut m);

    // Remount with the public peer gone: every chunk now comes from a peer behind NAT,
    // by hole punching or through the relay, and every file reads back.
    daemons[0].terminate(Duration::from_secs(20));
    let mut m = mount("mount-2.log");
    diff(&src, &mnt);
    unmount(&mut m);
    // Restore works the same way (the snapshot taken at the unmount).
    let restored = dir.path().join("restored");
    run(top
        .cmd("h4", bin("peerstash"))
        .arg("--home")
        .arg(&user)
        .args(["restore", "--snapshot", "latest", "--to"])
        .arg(&restored));
    diff(&src, &restored);
    // Repair too: what the public peer held is copied peer to peer between peers behind
    // NAT (punched, mapped or relayed) until every chunk is on 2 online peers again.
    let start = std::time::Instant::now();
    loop {
        let out = run(top
            .cmd("h4", bin("peerstash"))
            .arg("--home")
            .arg(&user)
            .arg("status"));
        if out.contains("peers:    3 online") && out.contains("safety:   all") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "not repaired behind NAT:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let m2 = metrics();
    assert!(
        metric(&m2, "peerstash_repairs_total{stage=\"done\"}") > 0,
        "{m2}"
    );
    if relay_only > 0 {
        assert!(
            metric(&m2, "peerstash_relay_bytes_total") > relayed,
            "{relay_only} chunks only the relay reaches, yet the remount read nothing through it"
        );
    }
    // Hole punching towards the cone NAT worked (home 1 at 203.0.113.11; the upload
    // stored chunks there): the client never fell back on the relay.
    for log in ["mount-1.log", "mount-2.log"] {
        let text = fs::read_to_string(dir.path().join(log)).unwrap();
        assert!(!text.contains("hole punching failed"), "{log}:\n{text}");
        assert!(
            !text.contains("no punch; trying the relay"),
            "{log}:\n{text}"
        );
        let punched = text
            .lines()
            .any(|l| l.contains("connected by hole punching") && l.contains("203.0.113.11:"));
        assert!(
            punched || log == "mount-2.log",
            "{log}: no punched connection:\n{text}"
        );
    }
    // The server's audits reach the peers behind NAT over their rendezvous connections:
    // each has passed some (new holders are audited at once) and failed none.
    assert_eq!(metric(&m2, "peerstash_audits_total{outcome=\"failed\"}"), 0);
    for (ns, name, _) in &peers[1..] {
        let start = std::time::Instant::now();
        loop {
            let out = run(top
                .cmd(ns, bin("peerstash"))
                .arg("--home")
                .arg(dir.path().join(name))
                .arg("status"));
            let line = out.lines().find(|l| l.starts_with("audits:")).unwrap_or("");
            let n = |word: &str| -> u64 {
                let before = line.split(word).next().unwrap_or("");
                let w = before.split_whitespace().last().unwrap_or("0");
                w.trim_matches(',').parse().unwrap_or(0)
            };
            assert_eq!(n(" failed"), 0, "{name}: {line}");
            if n(" passed") > 0 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(40),
                "{name}: no audit passed: {line}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    for d in &mut daemons {
        d.terminate(Duration::from_secs(20));
    }
    drop(server.proc);
}

/// The server's /metrics, fetched from inside the server's namespace.
fn server_metrics(top: &Topology, server: &Server) -> String {
    let url = server.url.clone();
    let fp: Fingerprint = server.fingerprint.parse().unwrap();
    in_netns(top.path("srv"), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            ServerClient::new(&url, fp)
                .unwrap()
                .metrics()
                .await
                .unwrap()
        })
    })
}

/// The `reach:` line of `peerstash status` for the peer at `home`, run in namespace `ns`.
fn reach_of(top: &Topology, ns: &str, home: &Path) -> String {
    let out = run(top
        .cmd(ns, bin("peerstash"))
        .arg("--home")
        .arg(home)
        .arg("status"));
    out.lines()
        .find(|l| l.starts_with("reach:"))
        .unwrap_or("")
        .to_string()
}

/// Why a real miniupnpd cannot run here, if it cannot.
fn why_no_miniupnpd() -> Option<String> {
    ["miniupnpd", "iptables-legacy"]
        .into_iter()
        .find(|tool| !installed(tool))
        .map(|tool| format!("{tool} is not installed (.ci/run installs miniupnpd)"))
}

/// Which protocol a router's miniupnpd offers.
#[derive(Clone, Copy, PartialEq)]
enum Igd {
    /// UPnP-IGD only (SSDP and SOAP; NAT-PMP and PCP off).
    Upnp,
    /// PCP only: miniupnpd serves NAT-PMP and PCP under one switch, so the router drops
    /// NAT-PMP datagrams (version 0) before they reach it.
    Pcp,
}

/// A real miniupnpd (Debian's package) on a home router: its own config and lease file
/// in the test's directory, in the foreground (`-d`), stopped at drop (SIGTERM: it
/// removes its rules; the namespace's deletion takes whatever is left).
struct Miniupnpd {
    proc: Proc,
}

impl Miniupnpd {
    /// Start it on `router` for the LAN `lan` (CIDR); `ext_ip` makes it announce that
    /// address as its public one instead of its own.
    fn start(
        top: &Topology,
        router: &str,
        lan: &str,
        igd: Igd,
        ext_ip: Option<&str>,
        dir: &Path,
    ) -> Miniupnpd {
        // The chains it fills, as Debian's iptables_init.sh makes them. Debian's
        // miniupnpd-iptables writes through libiptc, i.e. into the legacy tables, which
        // the kernel runs beside the nftables ones the routers' MASQUERADE lives in.
        let legacy = |args: &[&str]| {
            sh(top.cmd(router, "iptables-legacy").args(args)).unwrap();
        };
        for (table, chain, hook, dir) in [
            ("nat", "MINIUPNPD", "PREROUTING", "-i"),
            ("nat", "MINIUPNPD-POSTROUTING", "POSTROUTING", "-o"),
            ("mangle", "MINIUPNPD", "PREROUTING", "-i"),
        ] {
            legacy(&["-t", table, "-N", chain]);
            legacy(&["-t", table, "-I", hook, dir, "wan0", "-j", chain]);
        }
        legacy(&["-N", "MINIUPNPD"]);
        legacy(&[
            "-I",
            "FORWARD",
            "-i",
            "wan0",
            "!",
            "-o",
            "wan0",
            "-j",
            "MINIUPNPD",
        ]);
        if igd == Igd::Pcp {
            // The first byte of the UDP payload is the version: 0 NAT-PMP, 2 PCP.
            sh(top.cmd(router, "iptables").args([
                "-I",
                "INPUT",
                "-i",
                "lan0",
                "-p",
                "udp",
                "--dport",
                "5351",
                "-m",
                "u32",
                "--u32",
                "0>>22&0x3C@8>>24=0",
                "-j",
                "DROP",
            ]))
            .unwrap();
        }
        let (upnp, natpmp) = match igd {
            Igd::Upnp => ("yes", "no"),
            Igd::Pcp => ("no", "yes"),
        };
        let conf = dir.join(format!("miniupnpd-{router}.conf"));
        let mut text = format!(
            "ext_ifname=wan0\nlistening_ip=lan0\nport=0\nenable_upnp={upnp}\n\
             enable_natpmp={natpmp}\nsecure_mode=yes\nsystem_uptime=no\n\
             lease_file={}\nuuid=3d3c4e5a-1b2c-4d5e-8f90-{:012}\n\
             allow 1024-65535 {lan} 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n",
            dir.join(format!("miniupnpd-{router}.leases")).display(),
            router.trim_start_matches('r').parse::<u64>().unwrap(),
        );
        if let Some(ip) = ext_ip {
            text.push_str(&format!("ext_ip={ip}\n"));
        }
        fs::write(&conf, text).unwrap();
        let log = dir.join(format!("miniupnpd-{router}.log"));
        let mut cmd = top.cmd(router, "miniupnpd");
        cmd.arg("-d").arg("-f").arg(&conf).arg("-P");
        cmd.arg(dir.join(format!("miniupnpd-{router}.pid")));
        cmd.stdout(Stdio::null());
        cmd.stderr(fs::File::create(&log).unwrap());
        let mut proc = Proc::spawn(&format!("miniupnpd {router}"), cmd);
        // Daemons ask for their mapping when they first reach the server: the router
        // must listen by then.
        let ready = match igd {
            Igd::Upnp => "HTTP listening on port",
            Igd::Pcp => "Listening for NAT-PMP/PCP traffic",
        };
        wait_for("miniupnpd", Duration::from_secs(10), || {
            if let Ok(Some(s)) = proc.child.try_wait() {
                panic!(
                    "miniupnpd exited: {s}: {}",
                    fs::read_to_string(&log).unwrap()
                );
            }
            fs::read_to_string(&log)
                .unwrap()
                .contains(ready)
                .then_some(())
        });
        Miniupnpd { proc }
    }
}

impl Drop for Miniupnpd {
    fn drop(&mut self) {
        self.proc.terminate(Duration::from_secs(5));
    }
}

/// The DNAT rules miniupnpd installed on `router`.
fn mapping_rules(top: &Topology, router: &str) -> String {
    run(top
        .cmd(router, "iptables-legacy")
        .args(["-t", "nat", "-S", "MINIUPNPD"]))
}

#[test]
fn routers_running_miniupnpd_map_ports_by_upnp_igd_and_pcp() {
    if let Some(why) = cannot_make_namespaces().or_else(why_no_miniupnpd) {
        eprintln!("SKIPPED: home routers running miniupnpd need: {why}");
        return;
    }
    let mut top = Topology::new("b");
    let hosts = match top.build_igd() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("SKIPPED: cannot build the namespaced network: {e}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    // Home 1's router offers UPnP-IGD only, home 2's PCP only, home 3's UPnP-IGD but
    // lies about its public address (192.0.1.99 is nobody's).
    let _routers = [
        Miniupnpd::start(&top, "r1", "198.51.100.0/26", Igd::Upnp, None, dir.path()),
        Miniupnpd::start(&top, "r2", "198.51.100.64/26", Igd::Pcp, None, dir.path()),
        Miniupnpd::start(
            &top,
            "r3",
            "198.51.100.128/26",
            Igd::Upnp,
            Some("192.0.1.99"),
            dir.path(),
        ),
    ];
    let server = start_server(
        top.cmd("srv", bin("peerstash-server")),
        dir.path(),
        "203.0.113.1:7400",
    );
    let peers = [("h1", "upnp"), ("h2", "pcp"), ("h3", "liar")];
    let mut daemons = Vec::new();
    for ((ns, name), host) in peers.iter().zip(&hosts) {
        let home = dir.path().join(name);
        let listen = format!("{host}:7401");
        register(top.cmd(ns, bin("peerstash")), &server, &home, name, &listen);
        let mut serve = top.cmd(ns, bin("peerstash"));
        serve.arg("--home").arg(&home).arg("serve");
        serve.env("RUST_LOG", "info,peerstash::peer::portmap=debug");
        serve.stderr(fs::File::create(dir.path().join(format!("{name}.log"))).unwrap());
        daemons.push(Proc::spawn(name, serve));
    }

    // The server reached homes 1 and 2 through their mappings; `status` names the
    // protocol. Home 3's mapping (made, but announced at the address its router lied
    // about) led nowhere: it stays hole-punched only.
    let expected = [
        "mapped (UPnP-IGD; the router forwards a port; others connect straight to 192.0.1.11:7401)",
        "mapped (PCP; the router forwards a port; others connect straight to 192.0.1.12:7401)",
    ];
    for ((ns, name), want) in peers.iter().zip(expected) {
        let home = dir.path().join(name);
        wait_for(name, Duration::from_secs(30), || {
            reach_of(&top, ns, &home).contains(want).then_some(())
        });
    }
    let m = wait_for("the lying router's check", Duration::from_secs(30), || {
        let m = server_metrics(&top, &server);
        let failed = "peerstash_rendezvous_total{kind=\"mapping\",outcome=\"unreachable\"}";
        (metric(&m, failed) >= 1).then_some(m)
    });
    let liar = reach_of(&top, "h3", &dir.path().join("liar"));
    assert!(
        liar.contains("hole-punched only (behind NAT, public side 192.0.1.13:"),
        "{liar}"
    );
    let log = fs::read_to_string(dir.path().join("liar.log")).unwrap();
    assert!(
        log.contains("192.0.1.99:7401"),
        "the lie was never told:\n{log}"
    );
    assert_eq!(
        metric(
            &m,
            "peerstash_rendezvous_total{kind=\"mapping\",outcome=\"ok\"}"
        ),
        2,
        "{m}"
    );
    assert_eq!(metric(&m, "peerstash_peers_reachable{reach=\"mapped\"}"), 2);
    assert_eq!(metric(&m, "peerstash_peers_reachable{reach=\"punch\"}"), 1);

    // Each mapping is a real DNAT rule in its router's kernel for the daemon's port (the
    // legacy iptables tool cannot print the target revision miniupnpd writes, so the
    // destination is read from miniupnpd's lease file: the daemon's own address).
    for (router, host) in [("r1", &hosts[0]), ("r2", &hosts[1]), ("r3", &hosts[2])] {
        let rules = mapping_rules(&top, router);
        assert!(
            rules.lines().any(|l| l.contains("-p udp")
                && l.contains("--dport 7401")
                && l.contains("-j DNAT")),
            "{router}: {rules}"
        );
        let leases = dir.path().join(format!("miniupnpd-{router}.leases"));
        let leases = fs::read_to_string(leases).unwrap_or_default();
        let to = format!("UDP:7401:{host}:7401:");
        assert!(
            leases.lines().any(|l| l.starts_with(&to)),
            "{router}: {leases}"
        );
    }

    // The user behind its own NAT connects straight to the mapped addresses: a client
    // with no rendezvous at all (no punching, no relay), pinning each daemon's
    // certificate.
    let targets: Vec<_> = peers[..2]
        .iter()
        .zip(["192.0.1.11:7401", "192.0.1.12:7401"])
        .map(|((_, name), at)| {
            let cert = Home::new(dir.path().join(name)).load_peer_cert();
            PeerAddr::direct(at.parse().unwrap(), cert.unwrap().unwrap().fingerprint())
        })
        .collect();
    in_netns(top.path("h4"), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let client = PeerClient::new().unwrap();
            for t in &targets {
                let r = client.open_raw(t).await;
                assert!(r.is_ok(), "{}: {:?}", t.addr, r.err());
            }
            client.close();
        })
    });
    let m = server_metrics(&top, &server);
    for kind in ["punch", "relay"] {
        let asked = format!("peerstash_rendezvous_total{{kind=\"{kind}\",outcome=\"ok\"}}");
        assert_eq!(metric(&m, &asked), 0, "{m}");
    }

    // A daemon that stops deletes its mapping: the rule goes (by UPnP's
    // DeletePortMapping, by PCP's zero-lifetime MAP).
    for (d, router) in daemons.iter_mut().zip(["r1", "r2"]) {
        d.terminate(Duration::from_secs(20));
        wait_for("the mapping's deletion", Duration::from_secs(10), || {
            (!mapping_rules(&top, router).contains("--dport 7401")).then_some(())
        });
    }
    daemons[2].terminate(Duration::from_secs(20));
    drop(server.proc);
}

/// A registered peer's identity and rendezvous settings, from its home.
fn rendezvous_of(home: &Path) -> rv::RendezvousConfig {
    Home::new(home)
        .server_client()
        .unwrap()
        .rendezvous()
        .unwrap()
}

#[test]
fn forged_or_replayed_rendezvous_and_relay_messages_are_refused() {
    let net = common::net::Net::start_with(1, &["--public-metrics"]);
    let peer = net.home("peer-0");
    let pcfg = Home::new(&peer).load_config().unwrap();
    let target = pcfg.peer_id;
    let user = net.register("mallory", "1M");
    let me = rendezvous_of(&user);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let server = me.resolve().await.unwrap();
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let conn = rv::dial(&ep, server, me.fingerprint, Duration::from_secs(5))
            .await
            .unwrap();
        let t = Duration::from_secs(10);
        let mut body = target.0.to_be_bytes().to_vec();
        body.push(2);
        let refused = |r: Result<Vec<u8>, NatError>| match r {
            Err(NatError::Refused { status, detail }) => (status, detail),
            other => panic!("expected a refusal, got {other:?}"),
        };

        // A connect request signed with another key: bad_mac (5), no relay session.
        let stranger = peerstash::TransactionKey::generate().unwrap();
        let forged = ControlSigner::new(me.peer, &stranger, Direction::PeerToServer);
        let req = rv::signed(op::CONNECT, &forged, MessageKind::Rendezvous, &body);
        assert_eq!(
            refused(rv::request(&conn, &req, t).await),
            (Status::BadControl, 5)
        );
        // From a peer nobody registered.
        let nobody = ControlSigner::new(peerstash::PeerId(7), &stranger, Direction::PeerToServer);
        let req = rv::signed(op::CONNECT, &nobody, MessageKind::Rendezvous, &body);
        assert_eq!(
            refused(rv::request(&conn, &req, t).await),
            (Status::UnknownPeer, 0)
        );
        // Signed for another endpoint (a status request): wrong_kind (4).
        let req = rv::signed(op::CONNECT, &me.signer(), MessageKind::Status, &body);
        assert_eq!(
            refused(rv::request(&conn, &req, t).await),
            (Status::BadControl, 4)
        );
        // The body changed after signing (another target): bad_mac.
        let mut req = rv::signed(op::CONNECT, &me.signer(), MessageKind::Rendezvous, &body);
        let n = req.len();
        req[n - 2] ^= 1;
        assert_eq!(
            refused(rv::request(&conn, &req, t).await),
            (Status::BadControl, 5)
        );
        // A genuine request works once; the same bytes again are a replay (7).
        let req = rv::signed(op::CONNECT, &me.signer(), MessageKind::Rendezvous, &body);
        let grant = rv::RelayGrant::decode(&rv::request(&conn, &req, t).await.unwrap()).unwrap();
        assert_eq!(
            refused(rv::request(&conn, &req, t).await),
            (Status::BadControl, 7)
        );
        // Truncated and oversized requests.
        assert_eq!(
            refused(rv::request(&conn, &req[..40], t).await).0,
            Status::Malformed
        );
        let mut long = req.clone();
        long.resize(rv::MAX_REQUEST + 100, 0);
        assert!(rv::request(&conn, &long, t).await.is_err());

        // A hello claiming to be the daemon, signed with another key: refused, and the
        // daemon stays reachable as before.
        let fake = ControlSigner::new(target, &stranger, Direction::PeerToServer);
        let hello = rv::signed(op::HELLO, &fake, MessageKind::Rendezvous, &[2]);
        assert_eq!(
            refused(rv::request(&conn, &hello, t).await),
            (Status::BadControl, 5)
        );

        // The relay: a BIND with a wrong MAC is not answered and binds nothing; DATA
        // from an address that never proved the secret goes nowhere.
        let relay = std::net::SocketAddr::new(server.ip(), grant.port);
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut bad = grant.bind_datagram(rv::ROLE_CLIENT);
        bad[20] ^= 1;
        sock.send_to(&bad, relay).await.unwrap();
        let mut data = vec![rv::relay_op::DATA];
        data.extend_from_slice(&grant.session.to_be_bytes());
        data.extend_from_slice(b"not a quic packet");
        sock.send_to(&data, relay).await.unwrap();
        let mut buf = [0u8; 64];
        assert!(
            tokio::time::timeout(Duration::from_millis(500), sock.recv_from(&mut buf))
                .await
                .is_err(),
            "the relay answered a forged BIND"
        );
        // The genuine BIND is answered BOUND; replayed from another address it moves
        // nothing (no BOUND for the replayer).
        sock.send_to(&grant.bind_datagram(rv::ROLE_CLIENT), relay)
            .await
            .unwrap();
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(buf[0], rv::relay_op::BOUND);
        assert_eq!(n, 10);
        let other = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        other
            .send_to(&grant.bind_datagram(rv::ROLE_CLIENT), relay)
            .await
            .unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(500), other.recv_from(&mut buf))
                .await
                .is_err(),
            "a replayed BIND took over the session"
        );

        // Through the relay, the daemon's identity and tokens hold as on a direct
        // connection: a client pinning another certificate cannot connect (the relay
        // cannot stand in for the daemon), and a forged token is refused by the daemon.
        let daemon_addr: std::net::SocketAddr = pcfg.listen_addr.parse().unwrap();
        let fp = Home::new(&peer)
            .load_peer_cert()
            .unwrap()
            .unwrap()
            .fingerprint();
        let client = PeerClient::new().unwrap().with_rendezvous(me.clone());
        let wrong = PeerAddr {
            addr: daemon_addr,
            fingerprint: peerstash::tls::CertKey::self_signed(&["x"])
                .unwrap()
                .fingerprint(),
            via: Via::Relay(target),
        };
        match client.open_raw(&wrong).await {
            Err(PeerError::Connect { reason, .. }) => {
                assert!(reason.contains("fingerprint"), "{reason}")
            }
            other => panic!("connected to an impostor through the relay: {other:?}"),
        }
        let right = PeerAddr {
            fingerprint: fp,
            ..wrong
        };
        let forged_token = peerstash::Token::from_bytes(vec![1; 129]);
        let chunk = peerstash::ChunkId([9; 32]);
        match client.get(&right, &forged_token, &chunk, 100).await {
            Err(e) => assert!(e.is_refusal(), "{e}"),
            Ok(_) => panic!("a forged token fetched a chunk through the relay"),
        }
        let m = ServerClient::new(&net.url, me.fingerprint)
            .unwrap()
            .metrics()
            .await
            .unwrap();
        assert!(metric(&m, "peerstash_relay_bytes_total") > 0, "{m}");
        assert!(metric(&m, "peerstash_relay_dropped_total") >= 2, "{m}");
        assert_eq!(
            metric(&m, "peerstash_peers_reachable{reach=\"public\"}"),
            1,
            "{m}"
        );
    });
}

/// A daemon takes punch and relay orders only from its server, signed under its own key,
/// once: the server here is a bare QUIC endpoint the test controls, so it can send what a
/// real server never would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_orders_make_a_daemon_do_nothing() {
    use peerstash::peer::{Daemon, DaemonConfig, NullLink};
    use peerstash::tls::CertKey;
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let server_cert = CertKey::self_signed(&["localhost"]).unwrap();
    let crypto = server_cert.server_config(&[rv::ALPN]).unwrap();
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto).unwrap();
    let ep = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(crypto)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let key = peerstash::TransactionKey::generate().unwrap();
    let me = peerstash::PeerId(42);
    let mut cfg = DaemonConfig::new(
        me,
        key.clone(),
        "127.0.0.1:0".parse().unwrap(),
        dir.path().join("storage"),
        1 << 20,
        CertKey::self_signed(&["localhost"]).unwrap(),
        dir.path().join("state"),
    );
    cfg.rendezvous = Some(rv::RendezvousConfig {
        server: ep.local_addr().unwrap().to_string(),
        others: vec![],
        fingerprint: server_cert.fingerprint(),
        peer: me,
        key: key.clone(),
    });
    let daemon = Daemon::run(cfg, NullLink).await.unwrap();

    // The daemon's WHOAMI and HELLO, answered as the server would (no probe, no relay).
    let conn = ep.accept().await.unwrap().await.unwrap();
    for _ in 0..2 {
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let m = recv.read_to_end(rv::MAX_REQUEST).await.unwrap();
        let payload = match m[0] {
            op::WHOAMI => {
                let mut p = Vec::new();
                rv::encode_addr(conn.remote_address(), &mut p);
                p.extend_from_slice(&[0, 0, 0, 0]);
                p
            }
            op::HELLO => {
                assert_eq!(
                    m[1 + peerstash::control::AUTH_LEN..],
                    [1],
                    "a public daemon"
                );
                Vec::new()
            }
            other => panic!("unexpected request {other:#x}"),
        };
        send.write_all(&rv::reply(Status::Ok, 0, &payload))
            .await
            .unwrap();
        send.finish().unwrap();
    }
    wait_for("the hello", Duration::from_secs(10), || {
        daemon.reachability()
    });

    let victim = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut at = Vec::new();
    rv::encode_addr(victim.local_addr().unwrap(), &mut at);
    let t = Duration::from_secs(10);
    let order = |key: &peerstash::TransactionKey, peer, kind| {
        let signer = ControlSigner::new(peer, key, Direction::ServerToPeer);
        rv::signed(op::PUNCH, &signer, kind, &at)
    };
    let refused = |r: Result<Vec<u8>, NatError>| match r {
        Err(NatError::Refused { status, detail }) => (status, detail),
        other => panic!("expected a refusal, got {other:?}"),
    };
    let silent = |v: &tokio::net::UdpSocket| {
        let mut buf = [0u8; 2048];
        let got = v.try_recv_from(&mut buf).is_ok();
        assert!(!got, "the daemon sent packets on a refused order");
    };
    let stranger = peerstash::TransactionKey::generate().unwrap();
    let kind = MessageKind::RendezvousOrder;
    let forged = order(&stranger, me, kind);
    assert_eq!(
        refused(rv::request(&conn, &forged, t).await),
        (Status::BadControl, 5)
    );
    let other_peer = order(&key, peerstash::PeerId(43), kind);
    assert_eq!(
        refused(rv::request(&conn, &other_peer, t).await),
        (Status::BadControl, 2)
    );
    let wrong_kind = order(&key, me, MessageKind::StatusCheck);
    assert_eq!(
        refused(rv::request(&conn, &wrong_kind, t).await),
        (Status::BadControl, 4)
    );
    let reflected = {
        let signer = ControlSigner::new(me, &key, Direction::PeerToServer);
        rv::signed(op::PUNCH, &signer, kind, &at)
    };
    assert_eq!(
        refused(rv::request(&conn, &reflected, t).await),
        (Status::BadControl, 3)
    );
    let mut grant = rv::RelayGrant::random(9).unwrap().encode();
    let relay = rv::signed(
        op::RELAY,
        &ControlSigner::new(me, &stranger, Direction::ServerToPeer),
        kind,
        &grant,
    );
    assert_eq!(
        refused(rv::request(&conn, &relay, t).await),
        (Status::BadControl, 5)
    );
    grant.pop();
    let short = rv::signed(
        op::RELAY,
        &ControlSigner::new(me, &key, Direction::ServerToPeer),
        kind,
        &grant,
    );
    assert_eq!(
        refused(rv::request(&conn, &short, t).await).0,
        Status::Malformed
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    silent(&victim);

    // The genuine order is carried out: packets arrive from the daemon's own socket.
    let genuine = order(&key, me, kind);
    rv::request(&conn, &genuine, t).await.unwrap();
    let mut buf = [0u8; 2048];
    let (_, from) = tokio::time::timeout(Duration::from_secs(5), victim.recv_from(&mut buf))
        .await
        .expect("punch packets")
        .unwrap();
    assert_eq!(from, daemon.local_addr());
    // Played again, it is refused.
    assert_eq!(
        refused(rv::request(&conn, &genuine, t).await),
        (Status::BadControl, 7)
    );
    daemon.shutdown().await;
}
