//! `peerstash-server`: run the coordination server, or print invite codes.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use peerstash_server::{http, init, open_store, Config, Database, StartError};

/// The peerstash coordination server: registration, keys, placement and signed tokens.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Settings file (TOML; see /usr/share/doc/peerstash/examples/peerstash-server.toml):
    /// keys are the long flags with `_` for `-`; flags override it.
    #[arg(long, global = true, env = "PEERSTASH_SERVER_CONFIG")]
    config: Option<PathBuf>,
    /// State directory: database, master secret, TLS certificate (created on first start).
    #[arg(long, global = true, env = "PEERSTASH_SERVER_DATA")]
    data_dir: Option<PathBuf>,
    /// The database: `sqlite:PATH` (default: `server.db` in the data directory) or
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/NAME` (an existing database). Instances serve
    /// the same users when given the same database, each with a copy of the data directory.
    #[arg(long, global = true, env = "PEERSTASH_SERVER_DATABASE", value_parser = Database::parse)]
    database: Option<Database>,
    /// Address to listen on (HTTPS). Port 0 picks a free port; the chosen address is printed.
    #[arg(long, default_value = "127.0.0.1:7400")]
    listen: SocketAddr,
    /// An operator's TLS certificate (PEM or DER) instead of the self-signed one.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PKCS#8, PEM or DER).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Let anyone register, without an invite code.
    #[arg(long)]
    open_registration: bool,
    /// A peer may store (every replica counted) what it lends divided by this.
    #[arg(long, alias = "replicas-ratio", default_value_t = 1.5)]
    quota_ratio: f64,
    /// With audits on, what a peer may store before it holds anything for others (e.g.
    /// 1G, 500M): its quota is this plus its audited holdings / --quota-ratio, capped at
    /// what it lends / --quota-ratio.
    #[arg(long, default_value = "1G", value_parser = parse_size_arg)]
    quota_grace: u64,
    /// Lifetime of issued tokens, in seconds.
    #[arg(long, default_value_t = 600)]
    token_lifetime: u64,
    /// Heartbeat interval asked of storage daemons, in seconds.
    #[arg(long, default_value_t = 30)]
    heartbeat_interval: u64,
    /// A peer with no heartbeat for this many seconds counts as offline.
    #[arg(long, default_value_t = 90)]
    online_timeout: u64,
    /// Registrations and logins allowed per minute from one address (after the burst).
    #[arg(long, default_value_t = 30.0)]
    auth_per_minute: f64,
    /// Registrations and logins one address may make at once.
    #[arg(long, default_value_t = 20.0)]
    auth_burst: f64,
    /// Peak-load mode: issue universal tokens (any operation on the listed chunks).
    #[arg(long)]
    peak_load: bool,
    /// Most sealed snapshot roots kept per peer (the latest and earlier ones); a cap above
    /// the drives' own retention (at most 3600/interval + 26 + days: 176 by default).
    #[arg(long, default_value_t = 256)]
    keep_snapshots: usize,
    /// A storage daemon silent for this many seconds is lost: the chunks it held are
    /// copied from their other holders to new peers.
    #[arg(long, default_value_t = 3600)]
    repair_grace: u64,
    /// Seconds between two scans for chunks to repair.
    #[arg(long, default_value_t = 60)]
    repair_interval: u64,
    /// Seconds between two inventory reconciliations by each storage daemon (0: none):
    /// chunks on its disk the server does not expect there are deleted after
    /// --orphan-grace.
    #[arg(long, default_value_t = 3600)]
    reconcile_interval: u64,
    /// Seconds a daemon keeps a chunk the server does not expect there (stored, but never
    /// confirmed) after the last put that stored it.
    #[arg(long, default_value_t = 86400)]
    orphan_grace: u64,
    /// Seconds within which every stored chunk is audited at least once (a holder with
    /// few audits passed, four times as often); 0 turns audits off.
    #[arg(long, default_value_t = peerstash_server::DEFAULT_AUDIT_INTERVAL_SECS)]
    audit_interval: u64,
    /// Relay sessions open at once for peers behind symmetric NAT (0: no relay; peers
    /// that hole punching cannot reach are then unreachable).
    #[arg(long, default_value_t = 256)]
    relay_sessions: usize,
    /// Bytes per second one relay session may move (K, M, G suffixes: 8M).
    #[arg(long, default_value = "8M", value_parser = parse_rate)]
    relay_rate: u64,
    /// Bytes per second all relay sessions together may move (0: no overall cap).
    #[arg(long, default_value = "32M", value_parser = parse_cap)]
    relay_total_rate: u64,
    /// UDP port of the relay (0: any free port, printed at start); fix it to open it in
    /// a firewall.
    #[arg(long, default_value_t = 0)]
    relay_port: u16,
    /// UDP port of the probe endpoint that tells peers their NAT's kind (0: any free
    /// port, printed at start).
    #[arg(long, default_value_t = 0)]
    probe_port: u16,
    /// Where to serve `/metrics` (and `/healthz`) in plain HTTP, or `off`. It is
    /// unauthenticated: keep it on loopback or a private network. Port 0 picks a free
    /// port; the chosen address is printed.
    #[arg(long, default_value = peerstash_server::DEFAULT_METRICS_LISTEN, value_parser = parse_metrics_listen)]
    metrics_listen: MetricsListen,
    /// Also serve `/metrics` on the public --listen address, unauthenticated, as
    /// releases before --metrics-listen did.
    #[arg(long)]
    public_metrics: bool,
    #[command(subcommand)]
    command: Option<Cmd>,
}

/// A `--metrics-listen` value: an address, or `off`.
#[derive(Debug, Clone, Copy)]
struct MetricsListen(Option<SocketAddr>);

fn parse_metrics_listen(s: &str) -> Result<MetricsListen, String> {
    if s == "off" {
        return Ok(MetricsListen(None));
    }
    s.parse()
        .map(|a| MetricsListen(Some(a)))
        .map_err(|_| format!("{s:?} is neither an address (127.0.0.1:9464) nor off"))
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print one-time invite codes, one per line.
    Invite {
        /// How many codes.
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
    /// Write the man page into DIR (for packaging).
    #[command(hide = true)]
    Man { dir: PathBuf },
}

/// The command line, with a `--config` file's settings as defaults (flags override).
fn parse_cli() -> anyhow::Result<Cli> {
    use clap::{CommandFactory, FromArgMatches};
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let mut cmd = Cli::command();
    if let Some(file) = config_file_arg(&args) {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading the config file {}", file.display()))?;
        let table: toml::Table = text
            .parse()
            .with_context(|| format!("{}: not valid TOML", file.display()))?;
        for (key, value) in table {
            let id = key.replace('-', "_");
            if id == "config" || !cmd.get_arguments().any(|a| a.get_id() == id.as_str()) {
                anyhow::bail!("{}: unknown option {key:?}", file.display());
            }
            let v = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                _ => anyhow::bail!(
                    "{}: {key} must be a string, number or boolean",
                    file.display()
                ),
            };
            let v: &'static str = Box::leak(v.into_boxed_str());
            cmd = cmd.mut_arg(id, |a| a.default_value(v));
        }
    }
    let m = cmd.get_matches_from(args);
    Ok(Cli::from_arg_matches(&m).unwrap_or_else(|e| e.exit()))
}

/// The `--config FILE` (or `--config=FILE`) in `args`, or `PEERSTASH_SERVER_CONFIG`.
fn config_file_arg(args: &[std::ffi::OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--" {
            break;
        }
        if s == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = s.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
    }
    std::env::var_os("PEERSTASH_SERVER_CONFIG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn default_data_dir() -> PathBuf {
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/share/peerstash-server"),
        None => PathBuf::from("peerstash-server-data"),
    }
}

/// Every login and registration allocates ~19 MiB for Argon2id on some blocking thread.
/// glibc raises its mmap threshold after such a block is freed, so later blocks come from
/// per-thread arenas and stay resident (hundreds of MiB after a burst of logins). A fixed
/// threshold keeps large blocks mmapped, and freeing them returns the memory.
fn keep_large_allocations_mmapped() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    peerstash::size::parse_size(s).map_err(|e| e.to_string())
}

fn main() -> anyhow::Result<()> {
    keep_large_allocations_mmapped();
    let cli = parse_cli()?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal, never into journald or a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Some(Cmd::Man { dir }) = &cli.command {
        use clap::CommandFactory;
        std::fs::create_dir_all(dir)?;
        let mut out = Vec::new();
        clap_mangen::Man::new(Cli::command().name("peerstash-server")).render(&mut out)?;
        std::fs::write(dir.join("peerstash-server.1"), out)?;
        return Ok(());
    }
    let data_dir = cli.data_dir.clone().unwrap_or_else(default_data_dir);
    if let Some(Cmd::Invite { count }) = cli.command {
        if count == 0 || count > 10_000 {
            anyhow::bail!("--count must be 1 to 10000");
        }
        let db = Database::or_default(cli.database.as_ref(), &data_dir);
        let mut store = open_store(&data_dir, cli.database.as_ref())
            .with_context(|| format!("opening the server database {}", db.describe()))?;
        let codes = store
            .create_invites(count, peerstash::control::now_ms())
            .context("creating invite codes")?;
        let mut out = std::io::stdout().lock();
        for c in codes {
            writeln!(out, "{c}")?;
        }
        return Ok(());
    }
    if !(cli.quota_ratio > 0.0 && cli.quota_ratio.is_finite()) {
        anyhow::bail!("--quota-ratio must be a positive number");
    }
    if cli.token_lifetime == 0 || cli.token_lifetime > peerstash::token::MAX_LIFETIME_SECS {
        anyhow::bail!(
            "--token-lifetime must be 1 to {} seconds",
            peerstash::token::MAX_LIFETIME_SECS
        );
    }
    let cfg = Config {
        data_dir: data_dir.clone(),
        database: cli.database.clone(),
        listen: cli.listen,
        tls_cert: cli.tls_cert,
        tls_key: cli.tls_key,
        open_registration: cli.open_registration,
        quota_ratio: cli.quota_ratio,
        quota_grace_bytes: cli.quota_grace,
        token_lifetime_secs: cli.token_lifetime,
        heartbeat_interval_secs: cli.heartbeat_interval,
        online_timeout_secs: cli.online_timeout,
        auth_per_minute: cli.auth_per_minute,
        auth_burst: cli.auth_burst,
        peak_load: cli.peak_load,
        keep_snapshots: cli.keep_snapshots.max(1),
        repair_grace_secs: cli.repair_grace.max(1),
        repair_interval_secs: cli.repair_interval.max(1),
        reconcile_interval_secs: cli.reconcile_interval,
        orphan_grace_secs: cli.orphan_grace.max(1),
        audit_interval_secs: cli.audit_interval,
        metrics_listen: cli.metrics_listen.0,
        public_metrics: cli.public_metrics,
        relay: peerstash_server::rendezvous::RelayLimits {
            sessions: cli.relay_sessions,
            rate: cli.relay_rate,
            total_rate: cli.relay_total_rate,
            port: cli.relay_port,
            probe_port: cli.probe_port,
            ..Default::default()
        },
    };
    let database = Database::or_default(cfg.database.as_ref(), &data_dir);
    let state = init(cfg).map_err(|e| match e {
        StartError::Db(_) => anyhow::Error::new(e).context(format!(
            "opening the server database {} (pass --database to use another)",
            database.describe()
        )),
        e => anyhow::Error::new(e).context(format!(
            "preparing the data directory {} (pass --data-dir to use another)",
            data_dir.display()
        )),
    })?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(state.cfg.listen)
            .await
            .with_context(|| {
                format!(
                    "listening on {} (is another server running there? pick --listen)",
                    state.cfg.listen
                )
            })?;
        let addr = listener.local_addr()?;
        {
            // Machine-readable lines first, for scripts and tests.
            let mut out = std::io::stdout().lock();
            writeln!(out, "fingerprint: {}", state.fingerprint())?;
            writeln!(out, "listening: https://{addr}")?;
            out.flush()?;
        }
        let state = Arc::new(state);
        // The metrics listener is for the operator's monitoring: a busy port there is a
        // warning, not a reason to keep peers from their server.
        if let Some(at) = state.cfg.metrics_listen {
            match tokio::net::TcpListener::bind(at).await {
                Ok(l) => {
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "metrics: http://{}{}", l.local_addr()?, peerstash::api::path::METRICS)?;
                    out.flush()?;
                    if !at.ip().is_loopback() {
                        tracing::warn!(%at, "/metrics is unauthenticated and served beyond loopback");
                    }
                    tokio::spawn(http::serve_metrics(state.clone(), l));
                }
                Err(e) => tracing::warn!(%at, error = %e, "no /metrics listener (pick --metrics-listen, or off)"),
            }
        }
        // QUIC for peers behind NAT, on the same port number over UDP; the server works
        // without it (peers then need public addresses), so a busy port is a warning.
        match peerstash_server::rendezvous::start(state.clone(), addr, state.cfg.relay) {
            Ok(p) => {
                let mut out = std::io::stdout().lock();
                let relay = p.relay.map_or_else(|| "off".to_string(), |r| r.to_string());
                writeln!(out, "rendezvous: udp {} (probe {}, relay {relay})", p.main, p.probe)?;
                out.flush()?;
            }
            Err(e) => tracing::warn!(error = %e, "no rendezvous for peers behind NAT"),
        }
        let database = Database::or_default(state.cfg.database.as_ref(), &state.cfg.data_dir);
        tracing::info!(%addr, data_dir = %state.cfg.data_dir.display(), database = %database.describe(), open_registration = state.cfg.open_registration, "peerstash-server started");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = http::serve(state, listener) => r.context("serving")?,
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; stopping"),
            _ = term.recv() => tracing::info!("terminated; stopping"),
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(())
}

/// `8M`, `512K`, `1G` or plain bytes, per second.
/// A rate like [`parse_rate`], or 0 for none.
fn parse_cap(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        Ok(0)
    } else {
        parse_rate(s)
    }
}

fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().trim_end_matches("/s");
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?} is not a rate: bytes per second, e.g. 8M or 512K"))
}
