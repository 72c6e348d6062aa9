//! `peerstash local-cluster`: a whole network on loopback in one command — a server,
//! N storage peers and a user whose drive is mounted — for a first look and for demos.
//!
//! Every part is a real process (the `peerstash-server` binary found beside this one, and
//! this binary again for `register`, `serve` and `mount`), so what runs here is exactly
//! what runs across machines. State lives in one directory; a second run reuses it, so
//! files survive a restart.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Options of `local-cluster`.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Storage peers to start (besides the user).
    pub peers: usize,
    /// Where to mount the user's drive.
    pub mount: PathBuf,
    /// State directory (kept across runs).
    pub state: PathBuf,
    /// Space each peer lends, in bytes.
    pub lend_bytes: u64,
    /// Erasure coding for the user's drive (`K+M`) instead of replicas, at its first
    /// registration.
    pub erasure: Option<String>,
}

/// Addresses fixed at the first run, so peers keep the addresses they registered.
#[derive(Debug, Serialize, Deserialize)]
struct ClusterState {
    server_port: u16,
    peer_ports: Vec<u16>,
}

fn free_tcp() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn free_udp() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Children are stopped (SIGTERM, then SIGKILL) in reverse start order when dropped.
struct Children(Vec<(String, Child)>);

impl Children {
    fn stop_all(&mut self) {
        while let Some((name, mut child)) = self.0.pop() {
            if let Ok(None) = child.try_wait() {
                // SAFETY: plain kill(2) on a child we spawned and have not reaped.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(10) {
                    if let Ok(Some(_)) = child.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                if let Ok(None) = child.try_wait() {
                    eprintln!("local-cluster: {name} did not stop; killing it");
                    let _ = child.kill();
                }
            }
            let _ = child.wait();
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn sibling_binary(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe().context("finding the peerstash executable")?;
    let beside = me.with_file_name(name);
    if beside.exists() {
        return Ok(beside);
    }
    // Installed layout: both binaries on PATH.
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join(name);
            if p.exists() {
                return Ok(p);
            }
        }
    }
    bail!(
        "cannot find `{name}` next to {} or on PATH; build it with `cargo build --release --workspace`",
        me.display()
    )
}

/// Start the server and wait for its fingerprint line. `grace` is the quota a peer has
/// before it holds anything for others: the cluster's user runs no storage daemon, so
/// it stores on this alone.
fn start_server(
    bin: &Path,
    data_dir: &Path,
    port: u16,
    grace: u64,
    kids: &mut Children,
) -> Result<String> {
    let mut child = Command::new(bin)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--open-registration")
        .args(["--quota-grace", &grace.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().expect("piped");
    kids.0.push(("server".into(), child));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if let Some(fp) = parse_fingerprint_line(&line) {
                let _ = tx.send(fp);
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .context("the server did not print its certificate fingerprint within 30 s")
}

/// Finds 64 hex digits on a line that mentions a fingerprint.
fn parse_fingerprint_line(line: &str) -> Option<String> {
    if !line.to_ascii_lowercase().contains("fingerprint") {
        return None;
    }
    line.split(|c: char| !c.is_ascii_hexdigit())
        .find(|w| w.len() == 64)
        .map(|w| w.to_ascii_lowercase())
}

fn wait_tcp(port: u16, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the server did not listen on port {port} within {timeout:?}")
}

fn run_ok(mut cmd: Command, what: &str) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| what.to_string())?;
    if !out.status.success() {
        bail!(
            "{what} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Register `name` (home `home`) unless already registered, then start its daemon.
#[allow(clippy::too_many_arguments)]
fn ensure_peer(
    me: &Path,
    home: &Path,
    name: &str,
    server_url: &str,
    fingerprint: &str,
    password_file: &Path,
    lend_bytes: u64,
    listen_port: u16,
    extra: &[String],
) -> Result<()> {
    if home.join("config.toml").exists() {
        return Ok(());
    }
    fs::create_dir_all(home)?;
    let mut cmd = Command::new(me);
    cmd.arg("--home")
        .arg(home)
        .arg("register")
        .args(["--server", server_url, "--server-fingerprint", fingerprint])
        .args(["--name", name])
        .arg("--password-file")
        .arg(password_file)
        .args(["--lend", &lend_bytes.to_string()])
        .arg("--storage-dir")
        .arg(home.join("storage"))
        .args(["--listen", &format!("127.0.0.1:{listen_port}")])
        .args(extra);
    run_ok(cmd, &format!("registering {name}"))
}

static STOPS: AtomicU32 = AtomicU32::new(0);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOPS.fetch_add(1, Ordering::SeqCst);
}

/// A count of SIGINT, SIGTERM and SIGHUP received (the handler only adds to an atomic).
fn stop_count() -> &'static AtomicU32 {
    // SAFETY: installing an async-signal-safe handler that only touches an atomic.
    unsafe {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::signal(sig, on_stop_signal as *const () as libc::sighandler_t);
        }
    }
    &STOPS
}

/// Run the cluster until Ctrl-C (or until the mount exits).
pub fn run(opts: ClusterOptions) -> Result<()> {
    // From the start: the children have their own process groups, so a Ctrl-C during
    // start-up must reach us as a flag (then `kids` stops them), not kill us outright.
    let stops = stop_count();
    let interrupted = || {
        if stops.load(Ordering::SeqCst) > 0 {
            bail!("interrupted during start-up");
        }
        Ok(())
    };
    let me = std::env::current_exe()?;
    let server_bin = sibling_binary("peerstash-server")?;
    fs::create_dir_all(&opts.state)
        .with_context(|| format!("creating state directory {}", opts.state.display()))?;
    fs::create_dir_all(&opts.mount)
        .with_context(|| format!("creating mount point {}", opts.mount.display()))?;
    println!("local-cluster: state in {}", opts.state.display());

    let state_file = opts.state.join("cluster.toml");
    let mut st: ClusterState = match fs::read_to_string(&state_file) {
        Ok(s) => toml::from_str(&s).context("reading cluster.toml")?,
        Err(_) => ClusterState {
            server_port: free_tcp()?,
            peer_ports: Vec::new(),
        },
    };
    while st.peer_ports.len() < opts.peers {
        st.peer_ports.push(free_udp()?);
    }
    fs::write(&state_file, toml::to_string(&st)?)?;

    let password_file = opts.state.join("password");
    if !password_file.exists() {
        let mut pw = [0u8; 16];
        crate::keys::random_bytes(&mut pw)?;
        crate::client::home::write_private(&password_file, hex::encode(pw).as_bytes())?;
    }

    let mut kids = Children(Vec::new());
    let fingerprint = start_server(
        &server_bin,
        &opts.state.join("server"),
        st.server_port,
        opts.lend_bytes,
        &mut kids,
    )?;
    wait_tcp(st.server_port, Duration::from_secs(30))?;
    let url = format!("https://127.0.0.1:{}", st.server_port);
    println!("local-cluster: server {url} (fingerprint {fingerprint})");
    interrupted()?;

    for i in 0..opts.peers {
        let home = opts.state.join(format!("peer-{i}"));
        let name = format!("peer-{i}");
        ensure_peer(
            &me,
            &home,
            &name,
            &url,
            &fingerprint,
            &password_file,
            opts.lend_bytes,
            st.peer_ports[i],
            &[],
        )?;
        let child = Command::new(&me)
            .arg("--home")
            .arg(&home)
            .arg("serve")
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting the daemon of {name}"))?;
        kids.0.push((name, child));
    }
    println!("local-cluster: {} storage peers started", opts.peers);
    interrupted()?;

    let user_home = opts.state.join("user");
    let user_port = free_udp()?;
    ensure_peer(
        &me,
        &user_home,
        "user",
        &url,
        &fingerprint,
        &password_file,
        opts.lend_bytes,
        user_port,
        &opts
            .erasure
            .iter()
            .flat_map(|e| ["--erasure".to_string(), e.clone()])
            .collect::<Vec<_>>(),
    )?;
    let mut mount = Command::new(&me)
        .arg("--home")
        .arg(&user_home)
        .arg("mount")
        .arg(&opts.mount)
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .context("mounting the drive")?;
    println!(
        "local-cluster: drive mounted at {} — press Ctrl-C to unmount and stop everything",
        opts.mount.display()
    );

    // Ctrl-C reaches only us (each child has its own process group): the mount stops
    // first and uploads what is pending while the server and peers are still up; a
    // second Ctrl-C is passed on, and the mount leaves those uploads for the next run.
    let mut forwarded = 0;
    loop {
        if let Ok(Some(status)) = mount.try_wait() {
            if forwarded == 0 && !status.success() {
                eprintln!("local-cluster: the mount exited ({status}); stopping");
            }
            break;
        }
        let n = stops.load(Ordering::SeqCst).min(2);
        while forwarded < n {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(mount.id() as i32, libc::SIGTERM) };
            forwarded += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    kids.stop_all();
    println!(
        "local-cluster: stopped; state kept in {}",
        opts.state.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn fingerprint_line_is_found() {
        let hexed = "ab".repeat(32);
        assert_eq!(
            super::parse_fingerprint_line(&format!("fingerprint: {hexed}")),
            Some(hexed.clone())
        );
        assert_eq!(super::parse_fingerprint_line(&hexed), None);
    }
}
