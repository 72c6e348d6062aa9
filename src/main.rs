//! `peerstash`: the command line of a peer — register or log in with a coordination
//! server, lend disk (`serve`), mount the drive (`mount`), check the account (`status`),
//! list and restore earlier snapshots (`snapshots`, `restore`), or run everything on
//! loopback (`local-cluster`).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use peerstash::api::{KeyMode, LoginRequest, RegisterRequest};
use peerstash::client::home::{derive_passphrase_key, format_size, HomeConfig, DEFAULT_REPLICAS};
use peerstash::client::{parse_size, ClientError, Home, ServerClient};
use peerstash::drive::crypto::ChunkSealer;
use peerstash::drive::snapshot::{self, Root};
use peerstash::drive::DriveConfig;
use peerstash::peer::{Daemon, DaemonConfig, PeerClient};
use peerstash::remote::{HttpLink, RemoteBackend};
use peerstash::{DataKey, Fingerprint, TransactionKey};

/// A backup drive made of other people's spare disk.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// State directory (keys, config); several peers can live on one machine.
    #[arg(long, global = true, env = "PEERSTASH_HOME")]
    home: Option<PathBuf>,
    /// Settings file (TOML; see /usr/share/doc/peerstash/examples/peerstash.toml); flags
    /// override it.
    #[arg(long, global = true, env = "PEERSTASH_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Register a new user with a coordination server and set up this home.
    Register(RegisterArgs),
    /// Log in again (e.g. after a reinstall): restores the keys into this home.
    Login(LoginArgs),
    /// Lend disk: run the storage daemon.
    Serve,
    /// Mount the drive.
    Mount(MountArgs),
    /// Show this peer's account: quota, usage, peers online.
    Status(StatusArgs),
    /// List the drive's snapshots (the latest and the earlier ones kept), newest first.
    Snapshots,
    /// Restore a snapshot (or a path inside it) into a local directory.
    Restore(RestoreArgs),
    /// Read the drive's chunks back from every holder, check and decrypt them, and report
    /// bad holders to the server (which audits them and has bad copies replaced).
    Verify(VerifyArgs),
    /// Run a server, several peers and a mounted drive on loopback.
    LocalCluster(LocalClusterArgs),
    /// Write man pages into DIR (for packaging).
    #[command(hide = true)]
    Man { dir: PathBuf },
}

#[derive(Args, Debug)]
struct VerifyArgs {
    /// Check a random sample of this many percent of the chunks (default: all of them).
    #[arg(long, value_name = "PERCENT")]
    sample: Option<f64>,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum KeyModeArg {
    /// The server can restore the data key at login.
    Escrow,
    /// The data key comes from a recovery passphrase the server never sees.
    Passphrase,
}

#[derive(Args, Debug)]
struct ServerArgs {
    /// The coordination server, e.g. https://backup.example.org:7400. Several instances of
    /// it: repeat the flag or separate the URLs with commas; they are tried in this order
    /// when one cannot be reached (one --server-fingerprint pins them all).
    #[arg(long, required = true, value_delimiter = ',', value_name = "URL")]
    server: Vec<String>,
    /// The server certificate's SHA-256 (printed by peerstash-server at start); colons and
    /// a `sha256:` prefix are optional.
    #[arg(long)]
    server_fingerprint: Option<String>,
    /// User name.
    #[arg(long)]
    name: String,
    /// Read the password from this file's first line instead of asking.
    #[arg(long)]
    password_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct RegisterArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// One-time invite code from the server's operator.
    #[arg(long)]
    invite: Option<String>,
    /// Disk space to lend to others, e.g. 500M, 10G, 1.5G.
    #[arg(long, value_parser = parse_size_arg)]
    lend: u64,
    /// Where to keep others' chunks.
    #[arg(long)]
    storage_dir: PathBuf,
    /// Where the storage daemon listens (QUIC), host:port, as other peers reach it.
    #[arg(long, default_value = "127.0.0.1:7420")]
    listen: String,
    /// How the data key is kept.
    #[arg(long, value_enum, default_value = "escrow")]
    key_mode: KeyModeArg,
    /// Passphrase mode: read the recovery passphrase from this file instead of asking.
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
    /// Distinct peers each chunk is stored on.
    #[arg(long, default_value_t = DEFAULT_REPLICAS)]
    replicas: u8,
    /// Store chunks erasure-coded instead of replicated: K data + M parity shards on
    /// K+M distinct peers (e.g. `4+2`: survives 2 lost peers at 1.5× the size).
    #[arg(long, value_name = "K+M")]
    erasure: Option<peerstash::client::home::ErasureSpec>,
}

#[derive(Args, Debug)]
struct LoginArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Passphrase mode: read the recovery passphrase from this file instead of asking.
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
    /// Where to keep others' chunks (default: kept from this home's config, else HOME/storage).
    #[arg(long)]
    storage_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct StatusArgs {
    /// Then wait until every upload is confirmed on peers (progress on a terminal); exit 1
    /// with the reason when no progress is possible (over quota, drive not mounted,
    /// storage unreachable past --wait-limit).
    #[arg(long)]
    wait: bool,
    /// With --wait: how long an unreachable server or peers are waited out, in seconds.
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    wait_limit: u64,
}

#[derive(Args, Debug)]
struct MountArgs {
    /// Where to mount the drive.
    mountpoint: PathBuf,
    /// Run in the background.
    #[arg(long)]
    daemon: bool,
    /// Mount options, comma-separated: allow_other, ro, uid=N, gid=N, cache_size=SIZE
    /// (read cache, e.g. 512M), default_permissions (always on), auto_unmount (default) or
    /// noauto_unmount, writeback_cache, max_write=BYTES, fsync_timeout=SECS,
    /// nosync_on_close, threads=N, fsname=NAME. fstab's generic options (rw, _netdev,
    /// nofail, noauto, x-systemd.*...) are ignored. Snapshots: snapshot_interval=SECS
    /// (default 30), snapshot_keep=TIME (how long earlier snapshots stay restorable, e.g.
    /// 30d (default), 12h; thinned to hourly after an hour and daily after a day).
    #[arg(short = 'o')]
    options: Option<String>,
    /// Set by `--daemon` for the drive process it starts: leave the caller's process group
    /// only once the mount is up (see `mount_in_background`).
    #[arg(long, hide = true)]
    detach_when_mounted: bool,
}

#[derive(Args, Debug)]
struct RestoreArgs {
    /// Snapshot ID as `peerstash snapshots` lists it, or `latest`.
    #[arg(long)]
    snapshot: String,
    /// Directory to restore into: made if missing; an existing one must be empty.
    #[arg(long)]
    to: PathBuf,
    /// Restore only this path inside the drive, e.g. `docs/a` (a directory's content
    /// goes into --to; a file or link goes into --to under its name).
    #[arg(long)]
    path: Option<String>,
}

#[derive(Args, Debug)]
struct LocalClusterArgs {
    /// How many peers.
    #[arg(long, default_value_t = 3)]
    peers: usize,
    /// Where to mount the drive.
    #[arg(long)]
    mount: Option<PathBuf>,
    /// Where to keep the cluster's state (default ~/.local/share/peerstash/local-cluster).
    #[arg(long)]
    state: Option<PathBuf>,
    /// Space each peer lends.
    #[arg(long, default_value = "2G", value_parser = parse_size_arg)]
    lend: u64,
    /// Store the drive erasure-coded, K data + M parity shards (needs K+M peers), when the
    /// cluster's state is created.
    #[arg(long, value_name = "K+M")]
    erasure: Option<peerstash::client::home::ErasureSpec>,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn main() {
    let cli = parse_cli();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal, never into journald or a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The command line, with a `--config` file's settings as defaults.
fn parse_cli() -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let mut cmd = Cli::command();
    if let Some(file) = peerstash::client::home::config_file_arg(&args, "PEERSTASH_CONFIG") {
        cmd = peerstash::client::home::apply_config_file(cmd, &file).unwrap_or_else(|e| {
            eprintln!("error: {e}");
            std::process::exit(2)
        });
    }
    let m = cmd.get_matches_from(args);
    Cli::from_arg_matches(&m).unwrap_or_else(|e| e.exit())
}

/// `peerstash man DIR`: one page per command.
fn write_man_pages(dir: &Path) -> Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir)?;
    let cmd = Cli::command().name("peerstash");
    let mut pages = vec![(String::from("peerstash"), cmd.clone())];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("peerstash-{}", sub.get_name());
        let page = sub
            .clone()
            .name(&*Box::leak(name.clone().into_boxed_str()))
            .bin_name(format!("peerstash {}", sub.get_name()));
        pages.push((name, page));
    }
    for (name, page) in pages {
        let mut out = Vec::new();
        clap_mangen::Man::new(page).render(&mut out)?;
        std::fs::write(dir.join(format!("{name}.1")), out)?;
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    if let Command::Man { dir } = &cli.command {
        return write_man_pages(dir);
    }
    let home = Home::resolve(cli.home)?;
    match cli.command {
        Command::Register(a) => runtime()?.block_on(register(&home, a)),
        Command::Login(a) => runtime()?.block_on(login(&home, a)),
        Command::Status(a) => {
            let limit = std::time::Duration::from_secs(a.wait_limit);
            runtime()?.block_on(status(&home, a.wait.then_some(limit)))?;
            if a.wait {
                wait_for_uploads(&home, limit)?;
            }
            Ok(())
        }
        Command::Serve => serve(&home),
        Command::Snapshots => list_snapshots(&home),
        Command::Restore(a) => restore(&home, a),
        Command::Verify(a) => verify(&home, a),
        Command::Mount(a) => mount(&home, a),
        Command::LocalCluster(a) => local_cluster(a),
        Command::Man { .. } => unreachable!("handled above"),
    }
}

/// The home's settings and keys, with a hint when the home was never set up.
fn registered(home: &Home) -> Result<HomeConfig> {
    if !home.is_registered() {
        bail!(
            "{} holds no peer: run `peerstash register` (new user) or `peerstash login` \
             (after a reinstall) first, or pick the right --home",
            home.dir().display()
        );
    }
    Ok(home.load_config()?)
}

fn serve(home: &Home) -> Result<()> {
    let cfg = registered(home)?;
    let key = home.load_transaction_key()?;
    let cert = home.load_peer_cert()?.context(
        "this home has no storage daemon certificate: run `peerstash login` to make one",
    )?;
    let listen = std::net::ToSocketAddrs::to_socket_addrs(&cfg.listen_addr.as_str())
        .ok()
        .and_then(|mut a| a.next())
        .with_context(|| {
            format!(
                "the listen address {:?} in config.toml is not host:port",
                cfg.listen_addr
            )
        })?;
    let rt = runtime()?;
    rt.block_on(async {
        let server = home.server_client()?;
        prefer_live(&server).await;
        let mut dc = DaemonConfig::new(
            cfg.peer_id,
            key,
            listen,
            cfg.storage_dir.clone(),
            cfg.lend_bytes,
            cert,
            home.path("daemon"),
        );
        dc.advertise = Some(cfg.listen_addr.clone());
        dc.heartbeat_interval = peerstash::remote::HEARTBEAT_INTERVAL;
        // Behind NAT the daemon is reached through the server's rendezvous (QUIC on the
        // server's port): it learns there how it can be reached, and takes punch and relay
        // orders.
        dc.rendezvous = server.rendezvous();
        let daemon = Daemon::run(dc, HttpLink::new(server))
            .await
            .with_context(|| format!("starting the storage daemon on {listen}"))?;
        println!(
            "serving {} of {} for other peers on {} (peer {})",
            format_size(cfg.lend_bytes),
            cfg.storage_dir.display(),
            daemon.local_addr(),
            cfg.peer_id
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        println!("stopping the storage daemon");
        daemon.shutdown().await;
        Ok(())
    })
}

fn mount(home: &Home, a: MountArgs) -> Result<()> {
    let cfg = registered(home)?;
    let data_key = home.load_data_key()?;
    if a.daemon {
        return mount_in_background(home, &a);
    }
    // Block SIGINT/SIGTERM before any thread starts, so the drive's signal wait sees them
    // (and no runtime thread dies of them with the mount still up).
    peerstash::drive::fuse::block_stop_signals().context("blocking signals")?;
    if a.detach_when_mounted {
        detach_when_mounted(&a.mountpoint);
    }
    let rt = std::sync::Arc::new(runtime()?);
    let server = home.server_client()?;
    rt.block_on(prefer_live(&server));
    let mut backend =
        RemoteBackend::new(rt.clone(), server, cfg.replicas).context("starting the QUIC client")?;
    if let Some(e) = cfg.erasure {
        backend = backend.with_erasure(e.data, e.parity);
    }
    let backend = std::sync::Arc::new(backend);
    let state_dir = home.path("drive");
    // An empty drive state (a reinstall): rebuild the index from the latest snapshot.
    let restore_progress = Progress::spinner("peerstash");
    match peerstash::drive::snapshot::restore_if_empty(
        &state_dir,
        &data_key,
        &*backend,
        &*backend,
        |line| restore_progress.set_message(line.to_string()),
    ) {
        Ok(_) => {}
        Err(e @ peerstash::drive::SnapshotError::WrongKey) => bail!("{e}"),
        Err(e) => {
            return Err(anyhow::Error::new(e)
                .context("restoring the drive's index from its latest snapshot"))
        }
    }
    restore_progress.finish();
    let mut dc = DriveConfig::new(&a.mountpoint, state_dir, data_key, backend.clone());
    dc.options.roots = Some(backend);
    if let Some(o) = &a.options {
        dc.apply_options(o).map_err(anyhow::Error::msg)?;
    }
    eprintln!(
        "peerstash: mounted at {} — Ctrl-C or `fusermount3 -u {}` unmounts",
        a.mountpoint.display(),
        a.mountpoint.display()
    );
    peerstash::drive::run_foreground(dc)
        .with_context(|| format!("mounting the drive at {}", a.mountpoint.display()))?;
    Ok(())
}

/// `--daemon`: start the same command without it, and return once the mount is up (or
/// report why it failed).
///
/// The drive process stays in our process group until its mount is up, and only then
/// leaves it (`--detach-when-mounted`). Under a systemd automount, mount(8) and its helper
/// run in the process group the kernel's autofs lets through while it waits for the mount;
/// a drive started in a group of its own would block on its own mountpoint (the first
/// access then stalled 30 s and failed). Staying in that group for good would let the
/// drive walk through every other automount untriggered, hence the later detach.
fn mount_in_background(home: &Home, a: &MountArgs) -> Result<()> {
    let log = home.path("mount.log");
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("--home")
        .arg(home.dir())
        .arg("mount")
        .arg(&a.mountpoint)
        .arg("--detach-when-mounted");
    if let Some(o) = &a.options {
        cmd.arg("-o").arg(o);
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let mut child = cmd
        .spawn()
        .context("starting the mount in the background")?;
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(30) {
        if let Some(status) = child.try_wait()? {
            let msg = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("the mount exited ({status}):\n{msg}");
        }
        if is_fuse_mount(&a.mountpoint) {
            println!(
                "mounted at {} (pid {}; log {})",
                a.mountpoint.display(),
                child.id(),
                log.display()
            );
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    bail!(
        "the mount did not come up within 30 s; see {}",
        log.display()
    )
}

/// In the drive process `--daemon` starts: once the FUSE mount shows at `mountpoint`, start
/// a session of our own (no terminal's Ctrl-C or hangup, and no longer in the process
/// group autofs lets through). The path is resolved now, before the mount, while we are
/// still in the caller's group; the wait then only reads the mount table.
fn detach_when_mounted(mountpoint: &Path) {
    let Ok(canon) = mountpoint.canonicalize() else {
        return; // the mount fails on it with a clearer error
    };
    std::thread::spawn(move || {
        while !fuse_mounted_at(&canon) {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // SAFETY: setsid has no memory effects; it fails only for a group leader, which a
        // spawned child is not.
        if unsafe { libc::setsid() } < 0 {
            tracing::warn!("setsid: {}", std::io::Error::last_os_error());
        }
    });
}

fn is_fuse_mount(p: &Path) -> bool {
    p.canonicalize().is_ok_and(|canon| fuse_mounted_at(&canon))
}

/// Whether the mount table has a FUSE mount at `canon` (a canonical path).
fn fuse_mounted_at(canon: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let mut f = l.split(' ');
            let _src = f.next();
            f.next() == Some(&*canon.to_string_lossy())
                && f.next().is_some_and(|t| t.starts_with("fuse"))
        })
}

fn local_cluster(a: LocalClusterArgs) -> Result<()> {
    let base = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join(".local/share/peerstash");
    let state = a.state.unwrap_or_else(|| base.join("local-cluster"));
    let mount = a.mount.unwrap_or_else(|| state.join("mnt"));
    peerstash::cluster::run(peerstash::cluster::ClusterOptions {
        peers: a.peers.max(1),
        mount,
        state,
        lend_bytes: a.lend,
        erasure: a.erasure.map(|e| e.to_string()),
    })
}

/// A sealed root record fetched from the server: `None` when that version is not kept.
fn fetch_root(
    rt: &tokio::runtime::Runtime,
    client: &ServerClient,
    version: Option<u64>,
) -> Result<(Option<peerstash::api::RootRecord>, Vec<u64>)> {
    let r = rt
        .block_on(client.get_root(&peerstash::api::GetRootRequest { version }))
        .map_err(|e| explain(e, "asking the server for the drive's snapshots"))?;
    Ok((r.root, r.kept))
}

fn open_root(sealer: &ChunkSealer, rec: &peerstash::api::RootRecord) -> Result<Root> {
    let sealed = hex::decode(&rec.sealed).context("the server sent a root that is not hex")?;
    let root =
        Root::open(sealer, &sealed).with_context(|| format!("opening snapshot {}", rec.version))?;
    if root.version != rec.version {
        bail!(
            "snapshot {}'s record says version {}: refused",
            rec.version,
            root.version
        );
    }
    Ok(root)
}

/// Seconds since the epoch as local time, `YYYY-MM-DD HH:MM:SS`.
fn local_time(secs: i64) -> String {
    let t = secs as libc::time_t;
    // SAFETY: localtime_r writes into the tm we own.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return format!("@{secs}");
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// `peerstash snapshots`: what the server keeps, opened with the data key.
fn list_snapshots(home: &Home) -> Result<()> {
    registered(home)?;
    let sealer = ChunkSealer::new(&home.load_data_key()?);
    let client = home.server_client()?;
    let rt = runtime()?;
    let (_, kept) = fetch_root(&rt, &client, None)?;
    if kept.is_empty() {
        println!("no snapshots yet: a mounted drive stores one once its uploads settle");
        return Ok(());
    }
    println!(
        "{:<16}  {:<19}  {:>10}  {:>6}",
        "ID", "CREATED", "INDEX", "CHUNKS"
    );
    for (i, v) in kept.iter().enumerate() {
        let latest = if i == 0 { "  (latest)" } else { "" };
        // A version dropped meanwhile (expired) is skipped.
        let Some(rec) = fetch_root(&rt, &client, Some(*v))?.0 else {
            continue;
        };
        match open_root(&sealer, &rec) {
            Ok(root) => println!(
                "{:<16}  {:<19}  {:>10}  {:>6}{latest}",
                v,
                local_time(root.created),
                format_size(root.total_len),
                root.chunks.len()
            ),
            Err(e) => println!("{v:<16}  (cannot open: {e:#}){latest}"),
        }
    }
    Ok(())
}

/// `peerstash restore`: fetch a snapshot, load it into an index in memory, and write the
/// tree (or a path in it) into a local directory.
fn restore(home: &Home, a: RestoreArgs) -> Result<()> {
    let cfg = registered(home)?;
    // Refused before anything is fetched or written.
    peerstash::drive::restore::check_destination(&a.to)?;
    let version = match a.snapshot.as_str() {
        "latest" => None,
        s => Some(s.parse::<u64>().map_err(|_| {
            anyhow::anyhow!(
                "--snapshot {s:?}: give an ID as `peerstash snapshots` lists it, or `latest`"
            )
        })?),
    };
    let sealer = ChunkSealer::new(&home.load_data_key()?);
    let client = home.server_client()?;
    let rt = std::sync::Arc::new(runtime()?);
    // The snapshot's fetch has found a live instance: the backend's rendezvous uses it.
    let (rec, kept) = fetch_root(&rt, &client, version)?;
    let Some(rec) = rec else {
        match version {
            Some(v) => bail!(
                "no snapshot {v}: the server keeps {} snapshots of this drive;                  `peerstash snapshots` lists their IDs",
                kept.len()
            ),
            None => bail!("no snapshots yet: a mounted drive stores one once its uploads settle"),
        }
    };
    let root = open_root(&sealer, &rec)?;
    let backend =
        RemoteBackend::new(rt.clone(), client, cfg.replicas).context("starting the QUIC client")?;
    let progress = Progress::spinner("peerstash restore");
    progress.set_message(format!(
        "fetching snapshot {} ({} in {} chunks)",
        root.version,
        format_size(root.total_len),
        root.chunks.len()
    ));
    let data = snapshot::fetch_snapshot(&sealer, &backend, &root)
        .with_context(|| format!("fetching snapshot {}", root.version))?;
    let db = peerstash::drive::index::open(Path::new(":memory:"), 0, 0)
        .context("opening an index in memory")?;
    snapshot::load(&db, &data, |_| {})
        .with_context(|| format!("reading snapshot {}", root.version))?;
    let path = a.path.as_deref().unwrap_or("");
    let mut last = std::time::Instant::now();
    let stats = peerstash::drive::restore::restore_tree(&db, &backend, &sealer, path, &a.to, |s| {
        if last.elapsed() >= std::time::Duration::from_millis(500) {
            last = std::time::Instant::now();
            progress.set_message(format!("{} files, {}", s.files, format_size(s.bytes)));
        }
    })
    .with_context(|| {
        format!(
            "restoring snapshot {}{} into {}",
            root.version,
            a.path
                .as_deref()
                .map(|p| format!(" path {p:?}"))
                .unwrap_or_default(),
            a.to.display()
        )
    })?;
    progress.set_message(format!(
        "restored {} files ({}), {} directories, {} symlinks, {} hard links from snapshot {} into {}{}",
        stats.files,
        format_size(stats.bytes),
        stats.dirs,
        stats.symlinks,
        stats.hard_links,
        root.version,
        a.to.display(),
        if stats.skipped > 0 {
            format!(" ({} entries or xattrs skipped)", stats.skipped)
        } else {
            String::new()
        }
    ));
    progress.finish();
    Ok(())
}

/// `peerstash verify`: every copy of the drive's chunks (or a sample) read back and
/// checked; exits non-zero when anything is unreadable or a copy is bad.
fn verify(home: &Home, a: VerifyArgs) -> Result<()> {
    use peerstash::drive::{index, verify};
    registered(home)?;
    let sealer = ChunkSealer::new(&home.load_data_key()?);
    let client = home.server_client()?;
    let path = home.path("drive").join("index.sqlite");
    if !path.exists() {
        bail!("this home has no drive yet: mount it (or restore into it) first");
    }
    let db = index::open_reader(&path).context("opening the drive's index")?;
    let all = index::confirmed_chunks(&db).context("reading the drive's index")?;
    let total = all.len();
    let chunks = verify::sample(all, a.sample.unwrap_or(100.0))?;
    let rt = runtime()?;
    let report = rt.block_on(async {
        prefer_live(&client).await;
        let peers = PeerClient::new().context("starting the QUIC client")?;
        let peers = match client.rendezvous() {
            Some(r) => peers.with_rendezvous(r),
            None => peers,
        };
        verify::verify(&client, &peers, &sealer, &chunks)
            .await
            .context("verifying the drive's chunks")
    })?;
    for b in &report.bad {
        println!(
            "bad copy: chunk {} on peer {}: {}",
            b.chunk, b.holder, b.why
        );
    }
    for b in &report.unreachable {
        println!(
            "not checked: chunk {} on peer {}: {}",
            b.chunk, b.holder, b.why
        );
    }
    for c in &report.unreadable {
        println!("unreadable: chunk {c}");
    }
    println!(
        "verified {} of {} chunks ({} copies): {} bad copies (reported to the server), \
         {} holders unreachable, {} chunks unreadable",
        report.chunks,
        total,
        report.copies,
        report.bad.len(),
        report.unreachable.len(),
        report.unreadable.len()
    );
    if !report.unreadable.is_empty() || !report.bad.is_empty() {
        bail!(
            "{} chunks unreadable, {} bad copies",
            report.unreadable.len(),
            report.bad.len()
        );
    }
    Ok(())
}

/// With several server instances, settle on one that answers before its URL is handed
/// on: the rendezvous (QUIC to the same host and port) is built from the URL in use, and
/// does not move later. Nothing answering is not an error here: the calls that need the
/// server say so.
async fn prefer_live(client: &ServerClient) {
    if client.urls().len() > 1 {
        if let Err(e) = client.healthz().await {
            tracing::warn!("no server instance answers yet: {e}");
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The first line of a file, without its line ending (a trailing newline is not part of
/// a password).
fn read_secret_file(p: &Path, what: &str) -> Result<String> {
    let s = std::fs::read_to_string(p)
        .with_context(|| format!("reading the {what} from {}", p.display()))?;
    let line = s.lines().next().unwrap_or("").to_string();
    if line.is_empty() {
        bail!("{} is empty: put the {what} on its first line", p.display());
    }
    Ok(line)
}

fn ask_secret(prompt: &str, confirm: bool) -> Result<String> {
    if !std::io::stdin().is_terminal() {
        bail!("no terminal to ask the {prompt} on: pass it in a file (--password-file / --passphrase-file)");
    }
    let first = rpassword::prompt_password(format!("{prompt}: "))
        .with_context(|| format!("reading the {prompt}"))?;
    if confirm {
        let again = rpassword::prompt_password(format!("{prompt} (again): "))
            .with_context(|| format!("reading the {prompt}"))?;
        if again != first {
            bail!("the two entries differ; run the command again");
        }
    }
    Ok(first)
}

fn secret(file: &Option<PathBuf>, what: &str, confirm: bool) -> Result<String> {
    match file {
        Some(p) => read_secret_file(p, what),
        None => ask_secret(what, confirm),
    }
}

/// The pinned fingerprint: the flag, else the one this home already trusts.
fn fingerprint(home: &Home, a: &ServerArgs) -> Result<Fingerprint> {
    if let Some(f) = &a.server_fingerprint {
        return f
            .parse()
            .map_err(|e| anyhow::anyhow!("--server-fingerprint {f:?}: {e}; pass the 64 hex digits peerstash-server printed at start"));
    }
    if let Ok(cfg) = home.load_config() {
        // The pin this home trusts holds for the URLs it already knows.
        let known = |u: &String| {
            cfg.server_urls
                .iter()
                .any(|k| k.trim_end_matches('/') == u.trim().trim_end_matches('/'))
        };
        if a.server.iter().all(known) {
            return Ok(cfg.server_fingerprint);
        }
    }
    bail!(
        "pass --server-fingerprint: the 64 hex digits peerstash-server printed at start \
         (its `fingerprint:` line); the client trusts only that certificate"
    )
}

/// Turn a client error into a message that says what to do next.
fn explain(e: ClientError, action: &str) -> anyhow::Error {
    use peerstash::api::Reason;
    let hint = match (e.reason(), e.refused()) {
        (_, Some(Reason::BadInvite)) => {
            " (ask the server's operator for an invite: peerstash-server invite)"
        }
        (_, Some(Reason::NameTaken)) => {
            " (pick another --name, or `peerstash login` if it is yours)"
        }
        (_, Some(Reason::BadCredentials)) => " (check --name and the password)",
        (_, Some(Reason::RateLimited)) => " (wait a minute, then try again)",
        (_, Some(Reason::BadMac | Reason::UnknownPeer)) => {
            " (this home's keys do not match the server: run `peerstash login`)"
        }
        (None, _) => {
            " (is the server running at that URL, and is --server-fingerprint the one it printed?)"
        }
        _ => "",
    };
    anyhow::Error::new(e).context(format!("{action} failed{hint}"))
}

async fn register(home: &Home, a: RegisterArgs) -> Result<()> {
    if home.is_registered() {
        bail!(
            "{} already holds a peer; use another --home (or PEERSTASH_HOME) for a second peer, \
             or `peerstash login` to restore this one",
            home.dir().display()
        );
    }
    if a.replicas == 0 {
        bail!("--replicas must be at least 1");
    }
    let pin = fingerprint(home, &a.server)?;
    let password = secret(&a.server.password_file, "password", true)?;
    let key_mode = match a.key_mode {
        KeyModeArg::Escrow => KeyMode::Escrow,
        KeyModeArg::Passphrase => KeyMode::Passphrase,
    };
    let passphrase = match key_mode {
        KeyMode::Passphrase => Some(secret(&a.passphrase_file, "recovery passphrase", true)?),
        KeyMode::Escrow => None,
    };
    home.create()
        .with_context(|| format!("creating {}", home.dir().display()))?;
    let cert = home
        .ensure_peer_cert(&["localhost", "127.0.0.1", "peerstash-peer"])
        .context("creating the storage daemon's certificate")?;
    let client = ServerClient::with_urls(&a.server.server, pin)?;
    let resp = client
        .register(&RegisterRequest {
            name: a.server.name.clone(),
            password,
            invite: a.invite.clone(),
            lend_bytes: a.lend,
            quic_addr: a.listen.clone(),
            cert_fingerprint: cert.fingerprint(),
            key_mode,
        })
        .await
        .map_err(|e| explain(e, "registering"))?;
    let tkey = TransactionKey::from_hex(&resp.transaction_key)
        .context("the server sent a malformed transaction key")?;
    let dkey = data_key(
        key_mode,
        resp.data_key.as_deref(),
        passphrase.as_deref(),
        resp.peer_id,
    )?;
    home.save_transaction_key(&tkey)?;
    home.save_data_key(&dkey)?;
    std::fs::create_dir_all(&a.storage_dir)
        .with_context(|| format!("creating the storage directory {}", a.storage_dir.display()))?;
    home.save_config(&HomeConfig {
        server_urls: client.urls().to_vec(),
        server_fingerprint: pin,
        peer_id: resp.peer_id,
        name: a.server.name.clone(),
        lend_bytes: a.lend,
        storage_dir: a.storage_dir.clone(),
        listen_addr: a.listen.clone(),
        key_mode,
        replicas: a.replicas,
        erasure: a.erasure,
    })?;
    println!("registered {} as peer {}", a.server.name, resp.peer_id);
    println!("peer_id: {}", resp.peer_id);
    println!(
        "lending {}; you may store {} (every replica counted)",
        format_size(a.lend),
        format_size(resp.quota_bytes)
    );
    println!("keys and settings are in {}", home.dir().display());
    println!("next: `peerstash serve` to lend your disk, `peerstash mount DIR` to use the drive");
    Ok(())
}

fn data_key(
    mode: KeyMode,
    escrowed: Option<&str>,
    passphrase: Option<&str>,
    peer: peerstash::PeerId,
) -> Result<DataKey> {
    match mode {
        KeyMode::Escrow => {
            let hex = escrowed.context("the server sent no escrowed data key")?;
            DataKey::from_hex(hex).context("the server sent a malformed data key")
        }
        KeyMode::Passphrase => {
            let p = passphrase.context("a recovery passphrase is needed")?;
            derive_passphrase_key(p, peer)
                .map_err(|e| anyhow::anyhow!("deriving the data key from the passphrase: {e}"))
        }
    }
}

async fn login(home: &Home, a: LoginArgs) -> Result<()> {
    let pin = fingerprint(home, &a.server)?;
    let password = secret(&a.server.password_file, "password", false)?;
    let client = ServerClient::with_urls(&a.server.server, pin)?;
    let resp = client
        .login(&LoginRequest {
            name: a.server.name.clone(),
            password,
        })
        .await
        .map_err(|e| explain(e, "logging in"))?;
    let passphrase = match resp.key_mode {
        KeyMode::Passphrase => Some(secret(&a.passphrase_file, "recovery passphrase", false)?),
        KeyMode::Escrow => None,
    };
    let tkey = TransactionKey::from_hex(&resp.transaction_key)
        .context("the server sent a malformed transaction key")?;
    let dkey = data_key(
        resp.key_mode,
        resp.data_key.as_deref(),
        passphrase.as_deref(),
        resp.peer_id,
    )?;
    let old = home.load_config().ok();
    let storage_dir = a
        .storage_dir
        .or_else(|| old.as_ref().map(|c| c.storage_dir.clone()))
        .unwrap_or_else(|| home.dir().join("storage"));
    home.create()
        .with_context(|| format!("creating {}", home.dir().display()))?;
    // A reinstall has no daemon certificate: make a new one (the next heartbeat tells the
    // server its fingerprint).
    home.ensure_peer_cert(&["localhost", "127.0.0.1", "peerstash-peer"])
        .context("creating the storage daemon's certificate")?;
    home.save_transaction_key(&tkey)?;
    home.save_data_key(&dkey)?;
    std::fs::create_dir_all(&storage_dir)
        .with_context(|| format!("creating the storage directory {}", storage_dir.display()))?;
    home.save_config(&HomeConfig {
        server_urls: client.urls().to_vec(),
        server_fingerprint: pin,
        peer_id: resp.peer_id,
        name: a.server.name.clone(),
        lend_bytes: resp.lend_bytes,
        storage_dir,
        listen_addr: old
            .as_ref()
            .map(|c| c.listen_addr.clone())
            .unwrap_or(resp.quic_addr),
        key_mode: resp.key_mode,
        replicas: old.as_ref().map(|c| c.replicas).unwrap_or(DEFAULT_REPLICAS),
        erasure: old.as_ref().and_then(|c| c.erasure),
    })?;
    println!("logged in as {} (peer {})", a.server.name, resp.peer_id);
    println!("peer_id: {}", resp.peer_id);
    println!("keys restored into {}", home.dir().display());
    Ok(())
}

/// `peerstash status`. With `ride_out` (from `--wait`), an unreachable server is retried
/// with backoff for that long before giving up: a server restarting must not end a wait.
/// How other peers reach this peer's storage daemon, for `status`.
fn reach_line(reach: Option<&str>, public: Option<&str>, mapped_by: Option<&str>) -> String {
    let at = public.unwrap_or("?");
    match reach {
        Some("public") => format!("public (others connect straight to {at})"),
        Some("mapped") => format!(
            "mapped ({}; the router forwards a port; others connect straight to {at})",
            mapped_by.unwrap_or("port mapping")
        ),
        Some("punch") => format!(
            "hole-punched only (behind NAT, public side {at}; the server coordinates each connection)"
        ),
        Some("relay") => format!(
            "relayed (behind a symmetric NAT, public side {at}; others reach it through the server's relay)"
        ),
        Some(other) => other.to_string(),
        None => "unknown: the storage daemon has no rendezvous connection to the server (not running, \
                 or UDP to the server blocked); others reach it at its listen address if they can"
            .to_string(),
    }
}

async fn status(home: &Home, ride_out: Option<std::time::Duration>) -> Result<()> {
    let cfg = home.load_config()?;
    let client = home.server_client()?;
    let start = std::time::Instant::now();
    let mut pause = std::time::Duration::from_secs(1);
    let s = loop {
        match client.status().await {
            Ok(s) => break s,
            Err(e @ ClientError::Transport { .. })
                if ride_out.is_some_and(|limit| start.elapsed() + pause <= limit) =>
            {
                eprintln!(
                    "server unreachable ({:#}): retrying in {} s (gives up after {} s)",
                    // The cause chain on one line: a refused connection hides two levels down.
                    anyhow::Error::new(e),
                    pause.as_secs(),
                    ride_out.unwrap_or_default().as_secs()
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(15));
            }
            Err(e) => {
                // What is local still tells the user whether their data is safe.
                print_drive_summary(home)?;
                return Err(explain(e, "asking the server for this peer's status"));
            }
        }
    };
    println!("peer:     {} ({})", s.name, s.peer_id);
    println!(
        "server:   {}",
        server_line(&cfg.server_urls, client.base_url())
    );
    println!(
        "peers:    {} online of {} registered",
        s.peers_online, s.peers_total
    );
    println!(
        "quota:    {} used of {} ({} bytes of {})",
        format_size(s.used_bytes),
        format_size(s.quota_bytes),
        s.used_bytes,
        s.quota_bytes
    );
    match s.audited_bytes {
        Some(a) => println!(
            "lending:  {}, holding {} for others ({} audited; the quota grows with it)",
            format_size(s.lend_bytes),
            format_size(s.holding_bytes),
            format_size(a)
        ),
        None => println!(
            "lending:  {}, holding {} for others",
            format_size(s.lend_bytes),
            format_size(s.holding_bytes)
        ),
    }
    println!(
        "reach:    {}",
        reach_line(
            s.reach.as_deref(),
            s.reach_addr.as_deref(),
            s.mapped_by.as_deref()
        )
    );
    if let Some(a) = &s.standing {
        println!(
            "audits:   {} passed, {} failed; reputation {:.2}, uptime {:.2}; standing {}, {}",
            a.audits_passed,
            a.audits_failed,
            a.reputation,
            a.uptime,
            a.standing,
            if a.receiving_placements {
                "receiving placements"
            } else {
                "receiving no placements (what it holds is being moved to other peers)"
            }
        );
    }
    let target = match cfg.erasure {
        Some(e) => {
            println!("storage:  erasure-coded, {e} shards per chunk on distinct peers");
            format!("with all {} shards online", e.data + e.parity)
        }
        None => {
            println!("replicas: {}", cfg.replicas);
            format!(
                "on at least {} online peers",
                s.replicas.unwrap_or(cfg.replicas)
            )
        }
    };
    match (s.chunks, s.chunks_below_target) {
        (Some(0), _) => println!("safety:   nothing stored yet"),
        (Some(n), Some(0)) => println!("safety:   all {n} chunks {target}"),
        (Some(n), Some(below)) => println!(
            "safety:   {below} of {n} chunks below target, waiting for repair (a lost peer's \
             chunks are copied once it stays away past the server's grace period)"
        ),
        _ => println!("safety:   the server sent no figures"),
    }
    print_drive_summary(home)
}

/// The server's URLs for `status`, the one that answered marked.
fn server_line(urls: &[String], in_use: &str) -> String {
    if urls.len() == 1 {
        return urls[0].clone();
    }
    let list: Vec<String> = urls
        .iter()
        .map(|u| {
            if u.trim_end_matches('/') == in_use {
                format!("{u} (in use)")
            } else {
                u.clone()
            }
        })
        .collect();
    list.join(", ")
}

/// Progress on a terminal (indicatif); plain lines on stderr otherwise, so logs and
/// scripts still see what happened.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    prefix: &'static str,
    last: std::cell::RefCell<String>,
}

impl Progress {
    fn spinner(prefix: &'static str) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.enable_steady_tick(std::time::Duration::from_millis(120));
            b
        });
        Progress {
            bar,
            prefix,
            last: Default::default(),
        }
    }

    fn set_message(&self, m: String) {
        match &self.bar {
            Some(b) => b.set_message(m.clone()),
            None => eprintln!("{}: {m}", self.prefix),
        }
        *self.last.borrow_mut() = m;
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
            let last = self.last.borrow();
            if !last.is_empty() {
                eprintln!("{}: {last}", self.prefix);
            }
        }
    }
}

/// `status --wait`: block until the drive has no upload pending, with a progress bar of
/// the bytes still to confirm on a terminal. Ends with an error and the reason when no
/// progress is possible: over quota, no drive mounted, or storage unreachable for longer
/// than `limit` (the mounted drive publishes its uploader's health for this).
fn wait_for_uploads(home: &Home, limit: std::time::Duration) -> Result<()> {
    use peerstash::drive::health::{self, Verdict};
    let dir = home.path("drive");
    let first = peerstash::drive::index::summary_of(&dir).context("reading the drive's index")?;
    if first.pending_files > 0 {
        eprintln!(
            "waiting for the mounted drive to upload {} files ({})",
            first.pending_files,
            format_size(first.pending_bytes)
        );
    }
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(first.pending_bytes.max(1));
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "uploading {bar:30} {bytes}/{total_bytes} ({msg} files left)",
            )
            .expect("a valid template"),
        );
        b
    });
    let started = health::now_secs();
    let mut told = None;
    loop {
        let d = peerstash::drive::index::summary_of(&dir).context("reading the drive's index")?;
        if d.pending_files == 0 {
            break;
        }
        if let Some(b) = &bar {
            if d.pending_bytes > b.length().unwrap_or(0) {
                b.set_length(d.pending_bytes);
            }
            b.set_position(b.length().unwrap_or(0).saturating_sub(d.pending_bytes));
            b.set_message(d.pending_files.to_string());
        }
        let now = health::now_secs();
        let pending = format!(
            "{} files ({})",
            d.pending_files,
            format_size(d.pending_bytes)
        );
        let limit_secs = limit.as_secs().min(i64::MAX as u64) as i64;
        match health::verdict(health::read(&dir).as_ref(), now, started, limit_secs) {
            Verdict::Wait => {}
            Verdict::HeldUp(why) => {
                if told.as_ref() != Some(&why) {
                    eprintln!("uploads held up: {why}; still waiting");
                    told = Some(why);
                }
            }
            Verdict::NotMounted => bail!(
                "{pending} wait for upload, but the drive is not mounted: uploads happen only \
                 while it is (peerstash mount MOUNTPOINT)"
            ),
            Verdict::OverQuota(why) => bail!(
                "{pending} cannot be uploaded: over quota ({why}). Delete files from the drive \
                 (their space comes back once a snapshot covers the delete) or lend more disk \
                 (a larger --lend) to store more"
            ),
            Verdict::Unreachable(secs, why) => bail!(
                "{pending} wait for upload, but the storage has been unreachable for {secs} s \
                 ({why}). Check that the server is running and peers are online (peerstash \
                 status), then wait again"
            ),
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    println!("pending:  none: every file is confirmed on peers");
    Ok(())
}

fn print_drive_summary(home: &Home) -> Result<()> {
    let d = peerstash::drive::index::summary_of(&home.path("drive"))
        .context("reading the drive's index")?;
    println!(
        "drive:    {} entries, {} chunks ({}) on peers",
        d.inodes,
        d.chunks,
        format_size(d.stored_bytes)
    );
    println!(
        "pending:  {} uploads ({})",
        d.pending_files,
        format_size(d.pending_bytes)
    );
    if d.snapshot_version > 0 {
        println!(
            "snapshot: version {}{}",
            d.snapshot_version,
            if d.snapshot_current {
                " (up to date)"
            } else {
                " (changes since)"
            }
        );
    } else {
        println!("snapshot: none yet");
    }
    if d.snapshots_thinned > 0 {
        println!(
            "warning:  {} earlier snapshots were dropped before their time to give space \
             back (quota nearly full; the last at {})",
            d.snapshots_thinned,
            local_time(d.snapshot_thinned_at)
        );
    }
    if d.snapshots_kept > 0 {
        println!(
            "kept:     {} snapshots (`peerstash snapshots`); {} chunks ({}) held only for earlier ones; {} to release",
            d.snapshots_kept,
            d.held_chunks,
            format_size(d.held_bytes),
            d.releasable_chunks
        );
    }
    Ok(())
}
