//! A peer's state directory ("home"): `--home DIR`, else `$PEERSTASH_HOME`, else
//! `~/.local/share/peerstash`. Several peers can live on one machine, one home each.
//!
//! ```text
//! config.toml      server urls and fingerprint, peer id, name, lend, storage dir, ...
//! transaction.key  hex, 0600: authenticates this peer to the server
//! data.key         hex, 0600: encrypts this user's chunks
//! peer-cert.der    the storage daemon's QUIC certificate
//! peer-key.der     its private key, 0600
//! ```

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::api::KeyMode;
use crate::client::server_api::{ClientError, ServerClient};
use crate::ids::{Fingerprint, PeerId};
use crate::keys::{DataKey, TransactionKey};
use crate::tls::CertKey;

/// File names inside a home.
pub mod files {
    /// Settings.
    pub const CONFIG: &str = "config.toml";
    /// The transaction key (hex, 0600).
    pub const TRANSACTION_KEY: &str = "transaction.key";
    /// The data key (hex, 0600).
    pub const DATA_KEY: &str = "data.key";
    /// The daemon's QUIC certificate (DER).
    pub const PEER_CERT: &str = "peer-cert.der";
    /// Its private key (PKCS#8 DER, 0600).
    pub const PEER_KEY: &str = "peer-key.der";
}

/// Default replicas per chunk.
pub const DEFAULT_REPLICAS: u8 = 2;

/// Why the home could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    /// File system trouble.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// No `config.toml`: this home has not registered or logged in.
    #[error("{0} holds no peer yet: run `peerstash register` (new user) or `peerstash login` (existing user) first")]
    NotRegistered(PathBuf),
    /// `config.toml` is not valid.
    #[error("{path} is not a valid config: {message}")]
    BadConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A key file is damaged.
    #[error("{0} is not a valid key (64 hex digits)")]
    BadKey(PathBuf),
    /// No home directory could be determined.
    #[error("cannot tell where the state directory is: set --home or PEERSTASH_HOME")]
    NoHome,
    /// A certificate could not be generated.
    #[error("generating the peer certificate: {0}")]
    Cert(String),
}

/// The contents of `config.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HomeConfig {
    /// The coordination server's instances, `https://host:port`, in the order they are
    /// tried (one fingerprint pins them all). Written as `server_urls = [...]`; a config
    /// from before failover, with one `server_url = "..."`, reads as a list of one.
    #[serde(
        rename = "server_urls",
        alias = "server_url",
        deserialize_with = "one_or_many"
    )]
    pub server_urls: Vec<String>,
    /// Its pinned certificate fingerprint.
    pub server_fingerprint: Fingerprint,
    /// This peer's id.
    pub peer_id: PeerId,
    /// This peer's user name.
    pub name: String,
    /// Bytes lent to others.
    pub lend_bytes: u64,
    /// Where the storage daemon keeps others' chunks.
    pub storage_dir: PathBuf,
    /// Where the storage daemon listens (QUIC), `host:port`.
    pub listen_addr: String,
    /// How the data key is kept.
    pub key_mode: KeyMode,
    /// Distinct peers each chunk is stored on.
    #[serde(default = "default_replicas")]
    pub replicas: u8,
    /// Erasure coding instead of replicas for new chunks, e.g. `"4+2"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub erasure: Option<ErasureSpec>,
}

/// Reed-Solomon erasure coding: `data` + `parity` shards per chunk, written `K+M`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ErasureSpec {
    /// Data shards (`k`): any `k` shards rebuild a chunk.
    pub data: u8,
    /// Parity shards (`m`): how many lost peers a chunk survives.
    pub parity: u8,
}

impl std::str::FromStr for ErasureSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<ErasureSpec, String> {
        let bad = || format!("erasure coding is written K+M (e.g. 4+2), not {s:?}");
        let (k, m) = s.trim().split_once('+').ok_or_else(bad)?;
        let data: u8 = k.trim().parse().map_err(|_| bad())?;
        let parity: u8 = m.trim().parse().map_err(|_| bad())?;
        let max = crate::api::MAX_STRIPE_SHARDS;
        if data == 0 || parity == 0 || data as usize + parity as usize > max {
            return Err(format!(
                "erasure coding needs K ≥ 1, M ≥ 1 and K+M ≤ {max}, not {data}+{parity}"
            ));
        }
        Ok(ErasureSpec { data, parity })
    }
}

impl std::fmt::Display for ErasureSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}+{}", self.data, self.parity)
    }
}

impl TryFrom<String> for ErasureSpec {
    type Error = String;
    fn try_from(s: String) -> Result<ErasureSpec, String> {
        s.parse()
    }
}

impl From<ErasureSpec> for String {
    fn from(e: ErasureSpec) -> String {
        e.to_string()
    }
}

/// A string (the old `server_url`) or a list of strings.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

fn default_replicas() -> u8 {
    DEFAULT_REPLICAS
}

/// A peer's state directory.
#[derive(Debug, Clone)]
pub struct Home {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HomeError + '_ {
    move |source| HomeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Write `bytes` to `path` atomically with mode 0600.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), HomeError> {
    crate::keys::write_secret_file(path, bytes).map_err(io(path))
}

impl Home {
    /// The home at `dir` (nothing is created yet).
    pub fn new(dir: impl Into<PathBuf>) -> Home {
        Home { dir: dir.into() }
    }

    /// `flag` if given, else `$PEERSTASH_HOME`, else `~/.local/share/peerstash`.
    pub fn resolve(flag: Option<PathBuf>) -> Result<Home, HomeError> {
        if let Some(d) = flag {
            return Ok(Home::new(d));
        }
        if let Some(d) = std::env::var_os("PEERSTASH_HOME").filter(|d| !d.is_empty()) {
            return Ok(Home::new(d));
        }
        let home = std::env::var_os("HOME").ok_or(HomeError::NoHome)?;
        Ok(Home::new(
            PathBuf::from(home).join(".local/share/peerstash"),
        ))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of a file inside the home.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Create the directory (mode 0700) if needed.
    pub fn create(&self) -> Result<(), HomeError> {
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700)).map_err(io(&self.dir))
    }

    /// Whether a peer lives here (a config exists).
    pub fn is_registered(&self) -> bool {
        self.path(files::CONFIG).exists()
    }

    /// Read `config.toml`.
    pub fn load_config(&self) -> Result<HomeConfig, HomeError> {
        let p = self.path(files::CONFIG);
        let text = match fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(HomeError::NotRegistered(self.dir.clone()))
            }
            Err(e) => return Err(io(&p)(e)),
        };
        toml::from_str(&text).map_err(|e| HomeError::BadConfig {
            path: p,
            message: e.to_string(),
        })
    }

    /// Write `config.toml` (0600: it names the server and the peer).
    pub fn save_config(&self, cfg: &HomeConfig) -> Result<(), HomeError> {
        self.create()?;
        let p = self.path(files::CONFIG);
        let text = toml::to_string_pretty(cfg).map_err(|e| HomeError::BadConfig {
            path: p.clone(),
            message: e.to_string(),
        })?;
        write_private(&p, text.as_bytes())
    }

    fn load_hex(&self, name: &str) -> Result<String, HomeError> {
        let p = self.path(name);
        match fs::read_to_string(&p) {
            Ok(s) => Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(HomeError::NotRegistered(self.dir.clone()))
            }
            Err(e) => Err(io(&p)(e)),
        }
    }

    /// Store the transaction key (0600).
    pub fn save_transaction_key(&self, key: &TransactionKey) -> Result<(), HomeError> {
        self.create()?;
        write_private(
            &self.path(files::TRANSACTION_KEY),
            format!("{}\n", key.expose_hex()).as_bytes(),
        )
    }

    /// Read the transaction key.
    pub fn load_transaction_key(&self) -> Result<TransactionKey, HomeError> {
        TransactionKey::from_hex(&self.load_hex(files::TRANSACTION_KEY)?)
            .map_err(|_| HomeError::BadKey(self.path(files::TRANSACTION_KEY)))
    }

    /// Store the data key (0600).
    pub fn save_data_key(&self, key: &DataKey) -> Result<(), HomeError> {
        self.create()?;
        write_private(
            &self.path(files::DATA_KEY),
            format!("{}\n", key.expose_hex()).as_bytes(),
        )
    }

    /// Read the data key.
    pub fn load_data_key(&self) -> Result<DataKey, HomeError> {
        DataKey::from_hex(&self.load_hex(files::DATA_KEY)?)
            .map_err(|_| HomeError::BadKey(self.path(files::DATA_KEY)))
    }

    /// The daemon's QUIC certificate and key, if generated.
    pub fn load_peer_cert(&self) -> Result<Option<CertKey>, HomeError> {
        let cp = self.path(files::PEER_CERT);
        let kp = self.path(files::PEER_KEY);
        if !cp.exists() || !kp.exists() {
            return Ok(None);
        }
        Ok(Some(CertKey {
            cert_der: fs::read(&cp).map_err(io(&cp))?,
            key_der: fs::read(&kp).map_err(io(&kp))?,
        }))
    }

    /// The daemon's QUIC certificate, generated (self-signed for `names`) if missing.
    pub fn ensure_peer_cert(&self, names: &[&str]) -> Result<CertKey, HomeError> {
        if let Some(ck) = self.load_peer_cert()? {
            return Ok(ck);
        }
        self.create()?;
        let ck = CertKey::self_signed(names).map_err(|e| HomeError::Cert(e.to_string()))?;
        // Key first: a certificate without its key would be unusable.
        write_private(&self.path(files::PEER_KEY), &ck.key_der)?;
        write_private(&self.path(files::PEER_CERT), &ck.cert_der)?;
        Ok(ck)
    }

    /// A server client for this home's peer (config + transaction key).
    pub fn server_client(&self) -> Result<ServerClient, ClientOrHomeError> {
        let cfg = self.load_config()?;
        let key = self.load_transaction_key()?;
        Ok(
            ServerClient::with_urls(&cfg.server_urls, cfg.server_fingerprint)?
                .with_identity(cfg.peer_id, key),
        )
    }
}

/// Either a home problem or a client setup problem.
#[derive(Debug, thiserror::Error)]
pub enum ClientOrHomeError {
    /// The home.
    #[error(transparent)]
    Home(#[from] HomeError),
    /// The client.
    #[error(transparent)]
    Client(#[from] ClientError),
}

pub use crate::size::{parse_size, SizeError};

/// Show bytes the way [`parse_size`] reads them (`1.5G`, `500M`, `123B`).
pub fn format_size(n: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("T", 1 << 40),
        ("G", 1 << 30),
        ("M", 1 << 20),
        ("K", 1 << 10),
    ];
    for (u, m) in UNITS {
        if n >= m {
            let v = n as f64 / m as f64;
            return if v.fract() == 0.0 {
                format!("{}{u}", n / m)
            } else {
                format!("{v:.2}{u}")
            };
        }
    }
    format!("{n}B")
}

/// Passphrase mode: the data key from a recovery passphrase the server never sees, with
/// Argon2id salted by the peer id (so equal passphrases of two users give two keys).
pub fn derive_passphrase_key(passphrase: &str, peer: PeerId) -> Result<DataKey, String> {
    let mut salt = b"peerstash data key v1:".to_vec();
    salt.extend_from_slice(&peer.to_bytes());
    let mut out = [0u8; 32];
    argon2::Argon2::default()
        .hash_password_into(passphrase.as_bytes(), &salt, &mut out)
        .map_err(|e| e.to_string())?;
    let key = DataKey::from_bytes(out);
    zeroize::Zeroize::zeroize(&mut out);
    Ok(key)
}

/// Load a TOML config file into `cmd` as argument defaults, so that flags on the command
/// line override it. Top-level keys are the global arguments' ids (`home`); a table named
/// after a subcommand (`[register]`, `[mount]`, `[local-cluster]`) holds that
/// subcommand's arguments. Keys are the long flags with `_` for `-` (`storage_dir`,
/// `server_fingerprint`). Unknown keys are an error.
pub fn apply_config_file(cmd: clap::Command, path: &Path) -> Result<clap::Command, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("{}: not valid TOML: {e}", path.display()))?;
    config_defaults(cmd, &table, path, "")
}

fn config_defaults(
    mut cmd: clap::Command,
    table: &toml::Table,
    path: &Path,
    section: &str,
) -> Result<clap::Command, String> {
    for (key, value) in table {
        if let toml::Value::Table(sub) = value {
            if cmd.find_subcommand(key).is_none() {
                return Err(format!("{}: unknown section [{key}]", path.display()));
            }
            let sub_cmd = cmd.find_subcommand(key).cloned().expect("checked");
            let sub_cmd = config_defaults(sub_cmd, sub, path, key)?;
            cmd = cmd.mut_subcommand(key, |_| sub_cmd);
            continue;
        }
        let id = key.replace('-', "_");
        if id == "config" || !cmd.get_arguments().any(|a| a.get_id() == id.as_str()) {
            let place = if section.is_empty() {
                String::new()
            } else {
                format!(" in [{section}]")
            };
            return Err(format!("{}: unknown option {key:?}{place}", path.display()));
        }
        let v = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            // A list (`server = ["https://a:7400", "https://b:7400"]`) as the flag's
            // comma-separated form.
            toml::Value::Array(items) if items.iter().all(|v| v.is_str()) => items
                .iter()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join(","),
            _ => {
                return Err(format!(
                    "{}: {key} must be a string, number, boolean or list of strings",
                    path.display()
                ))
            }
        };
        let v: &'static str = Box::leak(v.into_boxed_str());
        cmd = cmd.mut_arg(id, |a| a.default_value(v).required(false));
    }
    Ok(cmd)
}

/// The `--config FILE` (or `--config=FILE`) in `args`, or `PEERSTASH_CONFIG`.
pub fn config_file_arg(args: &[std::ffi::OsString], env: &str) -> Option<PathBuf> {
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
    std::env::var_os(env)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("500M").unwrap(), 500 << 20);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size(" 7 MB ").unwrap(), 7 << 20);
        for bad in ["", "G", "-1G", "abc", "1.5X", "99999999999T", "nanG"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(format_size(1536 << 20), "1.50G");
        assert_eq!(format_size(500 << 20), "500M");
        assert_eq!(format_size(12), "12B");
    }

    #[test]
    fn keys_and_config_round_trip_with_private_modes() {
        let d = tempfile::tempdir().unwrap();
        let h = Home::new(d.path().join("h"));
        assert!(matches!(h.load_config(), Err(HomeError::NotRegistered(_))));
        let k = TransactionKey::generate().unwrap();
        h.save_transaction_key(&k).unwrap();
        assert_eq!(h.load_transaction_key().unwrap(), k);
        let mode = fs::metadata(h.path(files::TRANSACTION_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let cfg = HomeConfig {
            server_urls: vec!["https://127.0.0.1:1".into(), "https://127.0.0.2:1".into()],
            server_fingerprint: Fingerprint([7; 32]),
            peer_id: PeerId(42),
            name: "ann".into(),
            lend_bytes: 10,
            storage_dir: "/tmp/x".into(),
            listen_addr: "127.0.0.1:2".into(),
            key_mode: KeyMode::Passphrase,
            erasure: Some("4+2".parse().unwrap()),
            replicas: 3,
        };
        h.save_config(&cfg).unwrap();
        assert_eq!(h.load_config().unwrap(), cfg);
        let text = fs::read_to_string(h.path(files::CONFIG)).unwrap();
        assert!(text.contains("server_urls = ["), "{text}");
        // A config written before failover names one server_url: read unchanged.
        let mut table: toml::Table = text.parse().unwrap();
        table.remove("server_urls");
        table.insert("server_url".into(), "https://127.0.0.1:1".into());
        let old = toml::to_string(&table).unwrap();
        fs::write(h.path(files::CONFIG), old).unwrap();
        assert_eq!(
            h.load_config().unwrap(),
            HomeConfig {
                server_urls: vec!["https://127.0.0.1:1".into()],
                ..cfg.clone()
            }
        );
        let ck = h.ensure_peer_cert(&["localhost"]).unwrap();
        assert_eq!(
            h.ensure_peer_cert(&["localhost"]).unwrap().fingerprint(),
            ck.fingerprint()
        );
        let mode = fs::metadata(h.path(files::PEER_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_list_in_the_settings_file_is_the_flag_repeated() {
        let cmd = clap::Command::new("p").subcommand(
            clap::Command::new("login").arg(
                clap::Arg::new("server")
                    .long("server")
                    .value_delimiter(',')
                    .action(clap::ArgAction::Append),
            ),
        );
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("p.toml");
        fs::write(
            &file,
            "[login]\nserver = [\"https://a:1\", \"https://b:2\"]\n",
        )
        .unwrap();
        let m = apply_config_file(cmd, &file)
            .unwrap()
            .get_matches_from(["p", "login"]);
        let got: Vec<&String> = m
            .subcommand_matches("login")
            .unwrap()
            .get_many("server")
            .unwrap()
            .collect();
        assert_eq!(got, ["https://a:1", "https://b:2"]);
    }

    #[test]
    fn passphrase_key_depends_on_peer() {
        let a = derive_passphrase_key("correct horse", PeerId(1)).unwrap();
        assert_eq!(
            a,
            derive_passphrase_key("correct horse", PeerId(1)).unwrap()
        );
        assert_ne!(
            a,
            derive_passphrase_key("correct horse", PeerId(2)).unwrap()
        );
        assert_ne!(a, derive_passphrase_key("wrong horse", PeerId(1)).unwrap());
    }
}
