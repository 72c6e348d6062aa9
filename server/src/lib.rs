//! The peerstash coordination server: registration and key issuance, control-message
//! authentication, chunk placement with batch tokens, chunk locations and quotas.
//!
//! It never sees file data: peers send each other encrypted chunks over QUIC, under tokens
//! this server seals with the *target* peer's transaction key.

#![warn(missing_docs)]

pub mod audit;
pub mod channels;
pub mod error;
mod handlers;
pub mod http;
mod lease;
pub mod metrics;
pub mod placement;
pub mod probe;
pub mod ratelimit;
pub mod rendezvous;
pub mod repair;
pub mod secrets;
#[doc(hidden)]
pub mod sim;
pub mod store;

use std::collections::HashMap;
use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use peerstash::control::{ControlAuth, ControlError, ControlVerifier, Direction, MessageKind};
use peerstash::tls::CertKey;
use peerstash::{Fingerprint, MasterSecret, PeerId, TransactionKey};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub use error::Refusal;
use metrics::Metrics;
use ratelimit::RateLimiter;
use secrets::{write_secret_file, AtRest};
use store::{Store, StoreError};

/// File names inside the data directory.
pub mod files {
    /// The SQLite database.
    pub const DB: &str = "server.db";
    /// The control channels' counters (SQLite; see `channels`).
    pub const CHANNELS: &str = "channels.db";
    /// Held (flock) while the master secret, the certificate and the databases are read
    /// or made.
    pub const INIT_LOCK: &str = "init.lock";
    /// The master secret (hex, 0600).
    pub const MASTER: &str = "master.key";
    /// The self-signed TLS certificate (DER).
    pub const TLS_CERT: &str = "tls-cert.der";
    /// Its private key (PKCS#8 DER, 0600).
    pub const TLS_KEY: &str = "tls-key.der";
}

/// Default audit cycle: every location at least every 6 hours (a new holder's every 90
/// minutes), so a peer holding a dozen chunks sees a few audits an hour.
pub const DEFAULT_AUDIT_INTERVAL_SECS: u64 = 6 * 3600;

/// Where `/metrics` is served by default: loopback only, since it is unauthenticated.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";
/// Default starting quota (1 GiB): what a new peer may store before the audits show it
/// holds anything for others. Someone has to store first for anyone to earn.
pub const DEFAULT_QUOTA_GRACE: u64 = 1 << 30;

/// How the server runs. Defaults are the documented ones.
#[derive(Debug, Clone)]
pub struct Config {
    /// State directory (database, keys, certificate).
    pub data_dir: PathBuf,
    /// The database, when not `server.db` in the data directory (`--database`).
    pub database: Option<Database>,
    /// Address to listen on (port 0 picks a free one; the real one is printed).
    pub listen: SocketAddr,
    /// An operator's certificate (PEM or DER) instead of the self-signed one.
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM or DER).
    pub tls_key: Option<PathBuf>,
    /// Register without invite codes.
    pub open_registration: bool,
    /// Lent bytes divided by this is what a peer may store (every replica counted).
    pub quota_ratio: f64,
    /// With audits on, what a peer may store before it demonstrably holds anything for
    /// others: its quota is this plus its audited holdings divided by `quota_ratio`, at
    /// most what it lends divided by `quota_ratio`.
    pub quota_grace_bytes: u64,
    /// Lifetime of issued tokens, seconds.
    pub token_lifetime_secs: u64,
    /// Heartbeat interval asked of daemons, seconds.
    pub heartbeat_interval_secs: u64,
    /// A peer silent for this long is offline, seconds.
    pub online_timeout_secs: u64,
    /// Register/login requests allowed per minute per address (refill rate).
    pub auth_per_minute: f64,
    /// Register/login burst per address.
    pub auth_burst: f64,
    /// Peak-load mode: issue universal tokens instead of put/get tokens.
    pub peak_load: bool,
    /// Most sealed root records kept per peer (the latest and earlier ones): a cap; the
    /// drive's retention policy decides which earlier ones it keeps, and stays under it.
    pub keep_snapshots: usize,
    /// A holder silent for this long is lost: its chunks are copied to other peers,
    /// seconds.
    pub repair_grace_secs: u64,
    /// Time between two scans for chunks to repair, seconds.
    pub repair_interval_secs: u64,
    /// Time between two inventory reconciliations asked of daemons, seconds (0: none).
    pub reconcile_interval_secs: u64,
    /// A chunk on a daemon's disk that the server does not expect there is deleted once no
    /// put has stored it for this long, seconds.
    pub orphan_grace_secs: u64,
    /// Every chunk location is audited at least once per this many seconds (0: no
    /// audits).
    pub audit_interval_secs: u64,
    /// The relay of last resort for peers behind NAT.
    pub relay: rendezvous::RelayLimits,
    /// Where `/metrics` is served in plain HTTP (None: nowhere of its own).
    pub metrics_listen: Option<SocketAddr>,
    /// Serve `/metrics` on the public listener too (unauthenticated).
    pub public_metrics: bool,
}

impl Config {
    /// Defaults for `data_dir`.
    pub fn new(data_dir: PathBuf) -> Config {
        Config {
            data_dir,
            database: None,
            listen: "127.0.0.1:7400".parse().expect("valid address"),
            tls_cert: None,
            tls_key: None,
            open_registration: false,
            quota_ratio: 1.5,
            quota_grace_bytes: DEFAULT_QUOTA_GRACE,
            token_lifetime_secs: 600,
            heartbeat_interval_secs: 30,
            online_timeout_secs: 90,
            auth_per_minute: 30.0,
            auth_burst: 20.0,
            peak_load: false,
            keep_snapshots: 256,
            repair_grace_secs: 3600,
            repair_interval_secs: 60,
            reconcile_interval_secs: 3600,
            orphan_grace_secs: 86400,
            audit_interval_secs: DEFAULT_AUDIT_INTERVAL_SECS,
            metrics_listen: Some(DEFAULT_METRICS_LISTEN.parse().expect("valid address")),
            public_metrics: false,
            relay: rendezvous::RelayLimits::default(),
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// File system trouble.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// A secret could not be written or read.
    #[error(transparent)]
    Secret(#[from] secrets::SecretError),
    /// The database could not be opened.
    #[error("database: {0}")]
    Db(#[from] crate::store::db::Error),
    /// TLS material is unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// The master secret file is damaged.
    #[error("{0} is not a valid master secret (64 hex digits)")]
    BadMaster(String),
}

/// Everything a running server shares between requests.
pub struct State {
    /// Configuration.
    pub cfg: Config,
    /// The database (one writer at a time; SQLite serializes writes anyway).
    pub store: Mutex<Store>,
    /// Peers' transaction keys, decrypted once: all at start, and then any peer another
    /// instance sharing the database registered, when it first shows up here.
    keys: RwLock<HashMap<PeerId, TransactionKey>>,
    master: MasterSecret,
    at_rest: AtRest,
    /// Control-message checks (MAC, kind, time).
    verifier: ControlVerifier,
    /// The control channels' counters, shared by every instance on the data directory.
    channels: channels::Channels,
    /// Whether this instance holds the lease on the background jobs (repair scans,
    /// audits, status checks, sweeps): one instance at a time runs them.
    pub(crate) leader: std::sync::atomic::AtomicBool,
    /// Counters.
    pub metrics: Metrics,
    limiter: RateLimiter,
    /// Confirms waiting for the next group commit.
    confirm_queue: Mutex<Vec<handlers::QueuedConfirm>>,
    /// Bounds concurrent password hashing (register, login).
    hash_slots: tokio::sync::Semaphore,
    /// A repair scan is wanted after failed audits (many failures, one scan).
    pub(crate) scan_after_audits: std::sync::atomic::AtomicBool,
    /// TLS identity served.
    pub cert: CertKey,
    /// Daemons reachable through the rendezvous, and the relay's sessions.
    pub rendezvous: rendezvous::Registry,
}

impl State {
    /// The certificate fingerprint clients pin.
    pub fn fingerprint(&self) -> Fingerprint {
        self.cert.fingerprint()
    }

    /// `peer`'s transaction key; one registered through another instance is read from
    /// the database the first time. Blocking (it may take the store lock).
    pub(crate) fn key_of(&self, peer: PeerId) -> Option<TransactionKey> {
        if let Some(k) = self.keys.read().expect("not poisoned").get(&peer) {
            return Some(k.clone());
        }
        let blob = match self.store.lock().expect("not poisoned").key_blob(peer) {
            Ok(b) => b?,
            Err(e) => {
                tracing::warn!(%peer, "reading a peer's key: {e}");
                return None;
            }
        };
        let key = match self.at_rest.open(peer, &blob) {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(%peer, "a stored key does not open: {e}");
                return None;
            }
        };
        self.keys
            .write()
            .expect("not poisoned")
            .insert(peer, key.clone());
        Some(key)
    }

    /// Verify a control message to this server: a registered peer's key, the endpoint's
    /// kind, the MAC and the time, then its channel's counter, which every instance on
    /// the database shares (a message accepted by one is a replay to all). Blocking (the
    /// store). The outer error is the database's.
    pub(crate) fn verify_control(
        &self,
        auth: &ControlAuth,
        kind: MessageKind,
        body: &[u8],
    ) -> Result<Result<(), ControlError>, StoreError> {
        let Some(key) = self.key_of(auth.peer) else {
            return Ok(Err(ControlError::UnknownPeer(auth.peer)));
        };
        let now = peerstash::control::now_ms();
        if let Err(e) = self.verifier.check(auth, &key, kind, body, now) {
            return Ok(Err(e));
        }
        let advanced = self
            .channels
            .advance(auth.peer, auth.channel, auth.counter, now)?;
        Ok(advanced.map_err(|last| ControlError::Replayed {
            counter: auth.counter,
            last,
        }))
    }

    /// Forget control channels idle for twice the time window: their next message is
    /// stale anyway.
    pub(crate) fn sweep_channels(&self) -> Result<usize, StoreError> {
        let cutoff = peerstash::control::now_ms().saturating_sub(2 * self.verifier.window_ms());
        Ok(self.channels.sweep(cutoff)?)
    }

    /// Whether this instance runs the background jobs now.
    pub(crate) fn leads(&self) -> bool {
        self.leader.load(std::sync::atomic::Ordering::Relaxed)
    }
}

fn io_err(p: &Path) -> impl FnOnce(std::io::Error) -> StartError + '_ {
    move |e| StartError::Io(p.display().to_string(), e)
}

/// Create the data directory (mode 0700) if needed.
fn ensure_dir(dir: &Path) -> Result<(), StartError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
    Ok(())
}

/// Where the server's state lives (`--database`).
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    /// A SQLite file (`sqlite:PATH`).
    Sqlite(PathBuf),
    /// A PostgreSQL database (`postgres://user[:password]@host[:port]/name`).
    Postgres(String),
}

impl Database {
    /// Read a `--database` value: `sqlite:PATH` or a `postgres://` (`postgresql://`) URL.
    pub fn parse(s: &str) -> Result<Database, String> {
        if let Some(path) = s.strip_prefix("sqlite:") {
            // `sqlite:///srv/x.db` (URL style) is the same file as `sqlite:/srv/x.db`.
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() || path.ends_with('/') {
                return Err(format!("{s:?}: give the database file after sqlite: (sqlite:/var/lib/peerstash-server/server.db)"));
            }
            return Ok(Database::Sqlite(PathBuf::from(path)));
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return s
                .parse::<postgres::Config>()
                .map(|_| Database::Postgres(s.to_string()))
                .map_err(|e| format!("{}: {e}", Database::Postgres(s.to_string()).describe()));
        }
        Err(format!(
            "{s:?} is not a database: use sqlite:PATH or postgres://USER@HOST/NAME"
        ))
    }

    /// The database given, or `server.db` in `data_dir`.
    pub fn or_default(given: Option<&Database>, data_dir: &Path) -> Database {
        given
            .cloned()
            .unwrap_or_else(|| Database::Sqlite(data_dir.join(files::DB)))
    }

    /// For messages and logs: the file, or the URL without its password.
    pub fn describe(&self) -> String {
        match self {
            Database::Sqlite(p) => p.display().to_string(),
            Database::Postgres(url) => redact_password(url),
        }
    }
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// A URL's password (`scheme://user:password@host`) as `***`.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, host) = match rest.rfind('@') {
        Some(at) => rest.split_at(at),
        None => return url.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***{host}"),
        None => url.to_string(),
    }
}

/// A file that goes with the database `db`, so that every instance sharing the database
/// uses the same one (each may have its own copy of the data directory): beside a
/// `server.db`, `name` (the names a data directory has always had, so that an instance
/// given another's `server.db` by flag finds its files); beside any other, the database's
/// own name and `suffix` (as SQLite names its `-wal` file).
fn companion(db: &Path, name: &str, suffix: &str) -> PathBuf {
    if db.file_name() == Some(std::ffi::OsStr::new(files::DB)) {
        return db.with_file_name(name);
    }
    let mut p = db.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// The control channels' counters (see `channels`).
fn channels_path(db: &Path) -> PathBuf {
    companion(db, files::CHANNELS, "-channels")
}

/// Open the database (for `invite`, which must not need the secrets).
pub fn open_store(data_dir: &Path, database: Option<&Database>) -> Result<Store, StartError> {
    match database {
        None => ensure_dir(data_dir)?,
        Some(Database::Sqlite(db)) => ensure_db_dir(db)?,
        Some(Database::Postgres(_)) => {}
    }
    Ok(match Database::or_default(database, data_dir) {
        Database::Sqlite(db) => Store::open(&db)?,
        Database::Postgres(url) => Store::open_postgres(&url)?,
    })
}

/// Create the directory of a `--database` file if needed (mode 0700 when created here; an
/// existing one is left as the operator set it).
fn ensure_db_dir(db: &Path) -> Result<(), StartError> {
    match db.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) if !dir.exists() => ensure_dir(dir),
        _ => Ok(()),
    }
}

fn load_or_create_master(dir: &Path) -> Result<MasterSecret, StartError> {
    let p = dir.join(files::MASTER);
    match fs::read_to_string(&p) {
        Ok(s) => {
            MasterSecret::from_hex(&s).map_err(|_| StartError::BadMaster(p.display().to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let m = MasterSecret::generate().map_err(|e| StartError::Tls(e.to_string()))?;
            write_secret_file(&p, m.expose_hex().as_bytes())?;
            Ok(m)
        }
        Err(e) => Err(StartError::Io(p.display().to_string(), e)),
    }
}

fn read_pem_or_der_cert(p: &Path) -> Result<Vec<u8>, StartError> {
    let raw = fs::read(p).map_err(io_err(p))?;
    if raw.starts_with(b"-----") {
        CertificateDer::from_pem_slice(&raw)
            .map(|c| c.to_vec())
            .map_err(|e| StartError::Tls(format!("{}: {e}", p.display())))
    } else {
        Ok(raw)
    }
}

fn read_pem_or_der_key(p: &Path) -> Result<Vec<u8>, StartError> {
    let raw = fs::read(p).map_err(io_err(p))?;
    if raw.starts_with(b"-----") {
        match PrivateKeyDer::from_pem_slice(&raw) {
            Ok(PrivateKeyDer::Pkcs8(k)) => Ok(k.secret_pkcs8_der().to_vec()),
            Ok(_) => Err(StartError::Tls(format!(
                "{}: the key must be PKCS#8 (\"BEGIN PRIVATE KEY\")",
                p.display()
            ))),
            Err(e) => Err(StartError::Tls(format!("{}: {e}", p.display()))),
        }
    } else {
        Ok(raw)
    }
}

fn load_or_create_cert(cfg: &Config) -> Result<CertKey, StartError> {
    if let (Some(c), Some(k)) = (&cfg.tls_cert, &cfg.tls_key) {
        return Ok(CertKey {
            cert_der: read_pem_or_der_cert(c)?,
            key_der: read_pem_or_der_key(k)?,
        });
    }
    let cp = cfg.data_dir.join(files::TLS_CERT);
    let kp = cfg.data_dir.join(files::TLS_KEY);
    if cp.exists() && kp.exists() {
        return Ok(CertKey {
            cert_der: fs::read(&cp).map_err(io_err(&cp))?,
            key_der: fs::read(&kp).map_err(io_err(&kp))?,
        });
    }
    let ck = CertKey::self_signed(&["localhost", "127.0.0.1", "::1"])
        .map_err(|e| StartError::Tls(e.to_string()))?;
    // Key first: a cert without its key is useless, the reverse gets regenerated.
    write_secret_file(&kp, &ck.key_der)?;
    write_secret_file(&cp, &ck.cert_der)?;
    Ok(ck)
}

/// Create (if needed) and lock the file at `path` (flock, exclusive): held until the
/// returned file is closed.
fn lock_exclusive(path: &Path) -> Result<fs::File, StartError> {
    let file = fs::File::create(path).map_err(io_err(path))?;
    flock_exclusive(&file, path)?;
    Ok(file)
}

fn flock_exclusive(file: &fs::File, path: &Path) -> Result<(), StartError> {
    // SAFETY: flock on an open descriptor; released when the file is closed.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(file), libc::LOCK_EX) } != 0 {
        return Err(io_err(path)(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Lock the start-up lock that goes with the database `db`, unless it is the data
/// directory's own, already held as `held` (a second flock of it would wait forever).
fn lock_beside_db(db: &Path, held: &fs::File) -> Result<Option<fs::File>, StartError> {
    use std::os::unix::fs::MetadataExt;
    let path = companion(db, files::INIT_LOCK, "-init.lock");
    let file = fs::File::create(&path).map_err(io_err(&path))?;
    let (a, b) = (
        file.metadata().map_err(io_err(&path))?,
        held.metadata().map_err(io_err(&path))?,
    );
    if (a.dev(), a.ino()) == (b.dev(), b.ino()) {
        return Ok(None);
    }
    flock_exclusive(&file, &path)?;
    Ok(Some(file))
}

/// Prepare the data directory (creating the database, master secret and certificate on
/// first start) and load every peer's key.
pub fn init(cfg: Config) -> Result<State, StartError> {
    if cfg.tls_cert.is_some() != cfg.tls_key.is_some() {
        return Err(StartError::Tls(
            "--tls-cert and --tls-key go together".into(),
        ));
    }
    ensure_dir(&cfg.data_dir)?;
    // Instances started at once on a new data directory must not each make their own
    // master secret and certificate: the first makes them, the others read them.
    let init_lock = lock_exclusive(&cfg.data_dir.join(files::INIT_LOCK))?;
    let master = load_or_create_master(&cfg.data_dir)?;
    let cert = load_or_create_cert(&cfg)?;
    // Creating or migrating the databases too: SQLite refuses a second connection's
    // schema change at once ("database is locked") rather than wait for it.
    // Instances sharing a database but each with its own data directory: the schemas are
    // made under a lock beside the database as well.
    // (On PostgreSQL the database's own lock does that: see `store::db`.)
    let (store, channels) = match Database::or_default(cfg.database.as_ref(), &cfg.data_dir) {
        Database::Sqlite(db) => {
            let _db_lock = match &cfg.database {
                None => None,
                Some(_) => {
                    ensure_db_dir(&db)?;
                    lock_beside_db(&db, &init_lock)?
                }
            };
            let store = Store::open(&db)?;
            (store, channels::Channels::open(&channels_path(&db))?)
        }
        Database::Postgres(url) => (
            Store::open_postgres(&url)?,
            channels::Channels::open_postgres(&url)?,
        ),
    };
    drop(init_lock);
    let at_rest = AtRest::new(&master);
    let mut keys = HashMap::new();
    for (peer, blob) in store.all_key_blobs()? {
        keys.insert(peer, at_rest.open(peer, &blob)?);
    }
    let verifier = ControlVerifier::new(Direction::PeerToServer, peerstash::control::now_ms());
    let limiter = RateLimiter::new(cfg.auth_per_minute, cfg.auth_burst);
    Ok(State {
        cfg,
        store: Mutex::new(store),
        keys: RwLock::new(keys),
        master,
        at_rest,
        verifier,
        channels,
        metrics: Metrics::default(),
        limiter,
        confirm_queue: Mutex::new(Vec::new()),
        scan_after_audits: std::sync::atomic::AtomicBool::new(false),
        hash_slots: tokio::sync::Semaphore::new(
            std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .max(2),
        ),
        cert,
        rendezvous: rendezvous::Registry::default(),
        leader: std::sync::atomic::AtomicBool::new(false),
    })
}
