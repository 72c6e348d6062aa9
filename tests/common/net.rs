//! A real network for end-to-end tests: a `peerstash-server` process, `peerstash serve`
//! daemons and FUSE mounts by `peerstash mount`, plus the tree helpers the tests share.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::{bin, free_udp_port, wait_for, Proc};

pub const MARKER: &str = "PEERSTASH-PLAINTEXT-MARKER-7f3a";

pub fn run(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `peerstash --home HOME ARGS...`, which must succeed: its stdout.
pub fn peerstash_ok(home: &Path, args: &[&str]) -> String {
    run(Command::new(bin("peerstash"))
        .arg("--home")
        .arg(home)
        .args(args))
}

pub fn is_mounted(p: &Path) -> bool {
    let p = p.to_string_lossy().to_string();
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(p.as_str()))
}

/// A mount by `peerstash mount` in a child process; unmounted (SIGTERM, then a lazy
/// fusermount3) when dropped.
pub struct Mount {
    pub proc: Proc,
    pub at: PathBuf,
}

impl Mount {
    pub fn start(home: &Path, at: &Path) -> Mount {
        Mount::start_with(home, at, None)
    }

    pub fn start_with(home: &Path, at: &Path, options: Option<&str>) -> Mount {
        fs::create_dir_all(at).unwrap();
        let mut cmd = Command::new(bin("peerstash"));
        cmd.arg("--home").arg(home).arg("mount").arg(at);
        if let Some(o) = options {
            cmd.arg("-o").arg(o);
        }
        let proc = Proc::spawn("mount", cmd);
        let mut m = Mount {
            proc,
            at: at.to_path_buf(),
        };
        wait_for("the mount", Duration::from_secs(30), || {
            if let Ok(Some(s)) = m.proc.child.try_wait() {
                panic!("peerstash mount exited early: {s}");
            }
            is_mounted(at).then_some(())
        });
        m
    }

    /// Unmount the way Ctrl-C does, and check it went cleanly.
    pub fn stop(mut self) {
        self.proc.terminate(Duration::from_secs(20));
        assert!(!is_mounted(&self.at), "still mounted after SIGTERM");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if is_mounted(&self.at) {
            self.proc.terminate(Duration::from_secs(10));
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(&self.at)
                .status();
        }
    }
}

/// A server, storage daemons and one user, each a real process.
pub struct Net {
    pub dir: tempfile::TempDir,
    pub url: String,
    /// Where the server serves `/metrics` (plain HTTP, loopback).
    pub metrics_url: String,
    pub fingerprint: String,
    pub password: PathBuf,
    pub _server: Proc,
    server_args: Vec<String>,
    pub peers: Vec<Proc>,
}

/// What a server prints as it starts.
struct Started {
    fingerprint: String,
    url: String,
    metrics: String,
}

/// Read a starting server's start-up lines (then keep draining its output).
fn started(mut server: Proc) -> (Proc, Started) {
    let out = server.child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut s = Started {
        fingerprint: String::new(),
        url: String::new(),
        metrics: String::new(),
    };
    while s.fingerprint.is_empty() || s.url.is_empty() || s.metrics.is_empty() {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("server start-up lines");
        if let Some(f) = line.strip_prefix("fingerprint: ") {
            s.fingerprint = f.trim().to_string();
        } else if let Some(u) = line.strip_prefix("listening: ") {
            s.url = u.trim().to_string();
        } else if let Some(u) = line.strip_prefix("metrics: ") {
            s.metrics = u.trim().to_string();
        }
    }
    (server, s)
}

/// Another server instance on the same data directory as a [`Net`]'s.
pub struct Instance {
    /// Its process (killed when dropped).
    pub proc: Proc,
    /// Its HTTPS URL.
    pub url: String,
    metrics_url: String,
}

impl Instance {
    /// Its `/metrics` text.
    pub fn metrics(&self) -> String {
        metrics_at(&self.metrics_url)
    }
}

/// The `/metrics` text at `metrics_url` (plain HTTP, loopback).
fn metrics_at(metrics_url: &str) -> String {
    let (status, body) = super::http_get(metrics_url);
    assert_eq!(status, 200, "{body}");
    body
}

fn spawn_server(dir: &Path, listen: &str, metrics: &str, args: &[&str]) -> Proc {
    let mut cmd = Command::new(bin("peerstash-server"));
    cmd.arg("--data-dir")
        .arg(dir.join("server"))
        .args(["--listen", listen, "--open-registration"])
        .args(["--metrics-listen", metrics])
        .args(args)
        .stdout(Stdio::piped());
    Proc::spawn("server", cmd)
}

impl Net {
    pub fn start(peers: usize) -> Net {
        Net::start_with(peers, &[])
    }

    pub fn start_with(peers: usize, server_args: &[&str]) -> Net {
        let dir = tempfile::tempdir().unwrap();
        let server = spawn_server(dir.path(), "127.0.0.1:0", "127.0.0.1:0", server_args);
        let (server, started) = started(server);
        let (fingerprint, url, metrics_url) = (started.fingerprint, started.url, started.metrics);
        let password = dir.path().join("password");
        fs::write(&password, "correct horse battery staple\n").unwrap();
        let mut net = Net {
            dir,
            url,
            metrics_url,
            fingerprint,
            password,
            _server: server,
            server_args: server_args.iter().map(|a| a.to_string()).collect(),
            peers: Vec::new(),
        };
        for i in 0..peers {
            let home = net.register(&format!("peer-{i}"), "1G");
            let mut cmd = Command::new(bin("peerstash"));
            cmd.arg("--home").arg(&home).arg("serve");
            net.peers.push(Proc::spawn(&format!("peer-{i}"), cmd));
        }
        // Placement needs the daemons' first heartbeats.
        let user = net.register("probe", "1M");
        wait_for("peers online", Duration::from_secs(30), || {
            let s = run(Command::new(bin("peerstash"))
                .arg("--home")
                .arg(&user)
                .arg("status"));
            s.contains(&format!("{peers} online")).then_some(())
        });
        net
    }

    /// The server's `/metrics` text, from its metrics listener (plain HTTP, loopback).
    pub fn metrics(&self) -> String {
        metrics_at(&self.metrics_url)
    }

    /// Start another server instance on the same data directory (so the same database,
    /// master secret and certificate) on a free port.
    pub fn second_instance(&self) -> Instance {
        let args: Vec<&str> = self.server_args.iter().map(String::as_str).collect();
        let server = spawn_server(self.dir.path(), "127.0.0.1:0", "127.0.0.1:0", &args);
        let (proc, started) = started(server);
        Instance {
            proc,
            url: started.url,
            metrics_url: started.metrics,
        }
    }

    /// kill -9 the server now; `restart_server` brings it back on the same address.
    pub fn kill_server(&mut self) {
        self._server.kill9();
    }

    /// Start the server again (same data directory, address and options).
    pub fn restart_server(&mut self) {
        let addr = self
            .url
            .trim_start_matches("https://")
            .trim_end_matches('/');
        let args: Vec<&str> = self.server_args.iter().map(String::as_str).collect();
        let metrics = self
            .metrics_url
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or("127.0.0.1:0");
        self._server = spawn_server(self.dir.path(), addr, metrics, &args);
        let out = self._server.child.stdout.take().unwrap();
        std::thread::spawn(move || for _ in BufReader::new(out).lines().map_while(Result::ok) {});
    }

    pub fn home(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn register(&self, name: &str, lend: &str) -> PathBuf {
        self.register_with(name, lend, &[])
    }

    pub fn register_with(&self, name: &str, lend: &str, extra: &[&str]) -> PathBuf {
        let home = self.home(name);
        run(Command::new(bin("peerstash"))
            .arg("--home")
            .arg(&home)
            .arg("register")
            .args([
                "--server",
                &self.url,
                "--server-fingerprint",
                &self.fingerprint,
            ])
            .args(["--name", name, "--lend", lend])
            .arg("--password-file")
            .arg(&self.password)
            .arg("--storage-dir")
            .arg(home.join("storage"))
            .args(["--listen", &format!("127.0.0.1:{}", free_udp_port())])
            .args(extra));
        home
    }

    /// `peerstash login` as `name` into a fresh home `home`.
    pub fn login(&self, name: &str, home: &Path, extra: &[&str]) -> std::process::Output {
        Command::new(bin("peerstash"))
            .arg("--home")
            .arg(home)
            .arg("login")
            .args([
                "--server",
                &self.url,
                "--server-fingerprint",
                &self.fingerprint,
            ])
            .args(["--name", name])
            .arg("--password-file")
            .arg(&self.password)
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    pub fn storage_dirs(&self) -> Vec<PathBuf> {
        (0..self.peers.len())
            .map(|i| self.home(&format!("peer-{i}")).join("storage"))
            .collect()
    }
}

/// A tree with what backups meet: small files, a large one, empty files, symlinks, a
/// hard link, deep directories and odd names. Every file carries the marker.
pub fn make_tree(root: &Path, large_mib: usize) {
    fs::create_dir_all(root.join("deep/a/b/c/d/e")).unwrap();
    fs::create_dir_all(root.join("odd names/ünï cødé")).unwrap();
    for i in 0..150 {
        let p = root.join(format!("deep/a/small-{i}.txt"));
        fs::write(&p, format!("{MARKER} file {i} {}\n", "x".repeat(i * 7))).unwrap();
    }
    fs::write(
        root.join("deep/a/b/c/d/e/leaf.txt"),
        format!("{MARKER} leaf"),
    )
    .unwrap();
    fs::write(root.join("odd names/ünï cødé/sp ace & 'quote'.txt"), MARKER).unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    let mut big = fs::File::create(root.join("large.bin")).unwrap();
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..large_mib {
        for b in block.chunks_mut(8) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            b.copy_from_slice(&seed.to_le_bytes()[..b.len()]);
        }
        big.write_all(&block).unwrap();
    }
    big.write_all(MARKER.as_bytes()).unwrap();
    std::os::unix::fs::symlink("deep/a/small-1.txt", root.join("link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("dangling")).unwrap();
    fs::hard_link(root.join("deep/a/small-2.txt"), root.join("hard")).unwrap();
    fs::set_permissions(
        root.join("deep/a/small-3.txt"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
}

pub fn diff(a: &Path, b: &Path) {
    let out = Command::new("diff")
        .arg("-r")
        .arg("--no-dereference")
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "trees differ:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Mode and mtime of every entry, as `stat` prints them, relative to the root.
pub fn stat_tree(root: &Path) -> Vec<String> {
    let out = run(Command::new("find")
        .arg(".")
        .args(["-printf", "%p %M %n %T@\\n"])
        .current_dir(root));
    let mut lines: Vec<String> = out
        .lines()
        .filter(|l| !l.starts_with(". "))
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

/// fsync every regular file: returns once the drive has them confirmed on peers.
pub fn fsync_all(root: &Path) {
    run(Command::new("python3")
        .arg("-c")
        .arg(
            "import os,sys\n\
         for d,_,fs in os.walk(sys.argv[1]):\n\
         \x20 for f in fs:\n\
         \x20   p=os.path.join(d,f)\n\
         \x20   if os.path.islink(p): continue\n\
         \x20   fd=os.open(p,os.O_RDONLY); os.fsync(fd); os.close(fd)\n",
        )
        .arg(root));
}

/// grep -r for `needle` (fixed string) under `dirs`; true when found.
pub fn found_in(dirs: &[PathBuf], needle: &str) -> bool {
    Command::new("grep")
        .args(["-r", "-a", "-q", "-F", "--", needle])
        .args(dirs)
        .status()
        .unwrap()
        .success()
}

/// `cp -a SRC/. DST`: the way a user copies a tree into the mount.
pub fn copy_in(src: &Path, dst: &Path) {
    run(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", src.display()))
        .arg(dst));
}
