//! End-to-end tests of the coordination server: a real `peerstash-server` process on
//! loopback with its real database, the real `peerstash` binary for register and login,
//! and the `ServerClient` library against the live server for the rest.
//!
//! The suite runs twice, once per database: `sqlite::NAME` on SQLite (each data
//! directory's own `server.db`) and `postgres::NAME` on PostgreSQL (a cluster of the
//! test's own); see [`Backend`]. The tests about SQLite files are in `sqlite` only.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::postgres::PgCluster;
use common::{bin, http_get, Proc};
use peerstash::api::{
    ChunkRef, ConfirmRequest, GetRequest, HeartbeatRequest, KeyMode, LoginRequest, PutRequest,
    RegisterRequest, ReleaseRequest, ReportRequest, StatusResponse,
};
use peerstash::client::ServerClient;
use peerstash::control::{now_ms, ControlSigner, Direction, MessageKind};
use peerstash::peer::{PeerAddr, PeerClient, PeerError, TokenReason};
use peerstash::token::TokenVerifier;
use peerstash::{ChunkId, Fingerprint, PeerId, TransactionKey, TxKind};

const MIB: u64 = 1 << 20;
const PASSWORD: &str = "correct horse battery";

/// The database a test's servers run on.
#[derive(Clone)]
enum Backend {
    /// SQLite, the default: each data directory's own `server.db` (no `--database`).
    Sqlite,
    /// PostgreSQL on a cluster of the test's own: one database per data directory, so
    /// that instances on one data directory share it and a restart finds it again, as on
    /// SQLite. The cluster stops when the test's last server is gone.
    Postgres(Arc<PgCluster>),
}

impl Backend {
    /// PostgreSQL on a new cluster.
    fn postgres() -> Backend {
        Backend::Postgres(Arc::new(PgCluster::start()))
    }

    /// The `--database` arguments of a server (or `invite`) on `data_dir`: none on SQLite;
    /// on PostgreSQL the URL of the data directory's database, created if new (the server
    /// makes its schema, not the database).
    fn database_args(&self, data_dir: &Path) -> Vec<String> {
        match self {
            Backend::Sqlite => vec![],
            Backend::Postgres(pg) => {
                vec![
                    "--database".into(),
                    pg.create_database(&database_name(data_dir)),
                ]
            }
        }
    }

    /// One number from `sql` on the database of the servers on `data_dir`, read the way an
    /// operator would: with SQLite on its `server.db`, with `psql` on PostgreSQL. The two
    /// share their schema, so `sql` is the same.
    fn query_i64(&self, data_dir: &Path, sql: &str) -> i64 {
        match self {
            Backend::Sqlite => rusqlite::Connection::open(data_dir.join("server.db"))
                .unwrap()
                .query_row(sql, [], |r| r.get(0))
                .unwrap(),
            Backend::Postgres(pg) => {
                let out = pg.query(&pg.url(&database_name(data_dir)), sql);
                out.trim()
                    .parse()
                    .unwrap_or_else(|e| panic!("{sql}: {out:?} is not a number: {e}"))
            }
        }
    }
}

/// The PostgreSQL database of the servers on `data_dir`: named after the path (each test
/// has its own cluster and its own temporary directories, so names never meet).
fn database_name(data_dir: &Path) -> String {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    data_dir.hash(&mut h);
    format!("peerstash_{:016x}", h.finish())
}

/// A running `peerstash-server`, killed when dropped.
struct Server {
    /// First, so that it is killed before `backend` lets its cluster go.
    proc: Proc,
    url: String,
    /// Its metrics listener's `/metrics` (plain HTTP; empty with `--metrics-listen off`).
    metrics_url: String,
    fingerprint: Fingerprint,
    data_dir: PathBuf,
    /// What it runs on.
    backend: Backend,
    /// Its `--database` and the value (none for a data directory's own `server.db`);
    /// `invite` gets them too.
    database: Vec<String>,
}

impl Server {
    /// Start on `backend` on a free loopback port with `args`, and read the two lines it
    /// prints.
    fn start(backend: &Backend, data_dir: &Path, args: &[&str]) -> Server {
        Server::start_on(backend, data_dir, "127.0.0.1:0", args)
    }

    /// Kill it (-9) and start it again on the same address, data and `args`: clients and
    /// daemons that know its URL carry on.
    fn restart(&mut self, args: &[&str]) {
        self.proc.kill9();
        let listen = self.url.trim_start_matches("https://").to_string();
        *self = Server::start_on(&self.backend, &self.data_dir, &listen, args);
    }

    /// A `--database` in `args` is used as given; without one, the backend's for
    /// `data_dir`.
    fn start_on(backend: &Backend, data_dir: &Path, listen: &str, args: &[&str]) -> Server {
        let given = args.iter().position(|a| *a == "--database");
        let database: Vec<String> = match given {
            Some(i) => args[i..args.len().min(i + 2)]
                .iter()
                .map(|a| a.to_string())
                .collect(),
            None => backend.database_args(data_dir),
        };
        let mut cmd = Command::new(bin("peerstash-server"));
        cmd.arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", listen])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped());
        if given.is_none() {
            cmd.args(&database);
        }
        if !args.contains(&"--metrics-listen") {
            cmd.args(["--metrics-listen", "127.0.0.1:0"]);
        }
        let mut proc = Proc::spawn("peerstash-server", cmd);
        let stdout = proc.child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Keep reading so the server never blocks on a full pipe.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let (mut fp, mut url, mut metrics_url) = (None, None, None);
        let metrics_off = args.contains(&"off");
        while fp.is_none() || url.is_none() || (metrics_url.is_none() && !metrics_off) {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("the server prints its fingerprint and address");
            if let Some(v) = line.strip_prefix("fingerprint: ") {
                assert_eq!(v.len(), 64, "64 hex digits: {v}");
                fp = Some(v.parse().unwrap());
            } else if let Some(v) = line.strip_prefix("listening: ") {
                url = Some(v.to_string());
            } else if let Some(v) = line.strip_prefix("metrics: ") {
                metrics_url = Some(v.to_string());
            }
        }
        if let Backend::Postgres(_) = backend {
            // A server that quietly ran on SQLite would pass the whole suite.
            assert!(
                !data_dir.join("server.db").exists(),
                "a server on PostgreSQL made {}",
                data_dir.join("server.db").display()
            );
        }
        Server {
            proc,
            url: url.unwrap(),
            metrics_url: metrics_url.unwrap_or_default(),
            fingerprint: fp.unwrap(),
            data_dir: data_dir.to_path_buf(),
            backend: backend.clone(),
            database,
        }
    }

    fn client(&self) -> ServerClient {
        ServerClient::new(&self.url, self.fingerprint).unwrap()
    }

    fn invites(&self, n: usize) -> Vec<String> {
        let out = Command::new(bin("peerstash-server"))
            .arg("invite")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.database)
            .args(["--count", &n.to_string()])
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let codes: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        assert_eq!(codes.len(), n);
        codes
    }

    /// `/metrics`, from the metrics listener.
    fn metrics(&self) -> String {
        let (status, body) = http_get(&self.metrics_url);
        assert_eq!(status, 200, "{body}");
        body
    }

    /// One metric's value, summed over its label sets that contain `labels`.
    async fn metric(&self, name: &str, labels: &str) -> u64 {
        let text = self.metrics();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
            .filter(|l| l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }
}

/// A registered peer, with its client and key.
struct Peer {
    id: PeerId,
    key: TransactionKey,
    client: ServerClient,
}

async fn register(s: &Server, name: &str, lend: u64) -> Peer {
    let resp = s
        .client()
        .register(&RegisterRequest {
            name: name.into(),
            password: PASSWORD.into(),
            invite: None,
            lend_bytes: lend,
            quic_addr: format!("127.0.0.1:{}", 20000 + name.len()),
            cert_fingerprint: Fingerprint([name.len() as u8; 32]),
            key_mode: KeyMode::Escrow,
        })
        .await
        .unwrap();
    let key = TransactionKey::from_hex(&resp.transaction_key).unwrap();
    Peer {
        id: resp.peer_id,
        key: key.clone(),
        client: s.client().with_identity(resp.peer_id, key),
    }
}

async fn heartbeat(p: &Peer, free: u64) -> Vec<ChunkId> {
    heartbeat_ack(p, free, vec![]).await
}

async fn heartbeat_ack(p: &Peer, free: u64, dropped: Vec<ChunkId>) -> Vec<ChunkId> {
    p.client
        .heartbeat(&HeartbeatRequest {
            quic_addr: format!("127.0.0.1:{}", 30000 + (p.id.0 % 1000)),
            cert_fingerprint: Fingerprint([1; 32]),
            free_bytes: free,
            used_bytes: 0,
            dropped,
        })
        .await
        .unwrap()
        .drop
}

fn chunks(tag: &str, n: usize, size: u32) -> Vec<ChunkRef> {
    (0..n)
        .map(|i| ChunkRef {
            id: ChunkId::of(format!("{tag}-{i}").as_bytes()),
            size,
        })
        .collect()
}

fn put_req(c: &[ChunkRef], replicas: u8) -> PutRequest {
    PutRequest {
        chunks: c.to_vec(),
        replicas,
        exclude: vec![],
        stripes: vec![],
    }
}

/// A storage daemon, a real process: a home registered by the real CLI, lending disk with
/// `peerstash serve` over real QUIC.
struct Lender {
    proc: Option<Proc>,
    home: PathBuf,
    id: PeerId,
    storage: PathBuf,
}

impl Lender {
    fn register(s: &Server, dir: &Path, name: &str) -> Lender {
        let home = dir.join(name);
        let storage = dir.join(format!("{name}-storage"));
        let pw = dir.join(format!("{name}-pw"));
        std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
        let o = run_cli(
            &home,
            &[
                "register",
                "--server",
                &s.url,
                "--server-fingerprint",
                &s.fingerprint.to_string(),
                "--name",
                name,
                "--password-file",
                pw.to_str().unwrap(),
                "--lend",
                "1G",
                "--storage-dir",
                storage.to_str().unwrap(),
                "--listen",
                &format!("127.0.0.1:{}", common::free_udp_port()),
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let id = peerstash::client::Home::new(&home)
            .load_config()
            .unwrap()
            .peer_id;
        let mut l = Lender {
            proc: None,
            home,
            id,
            storage,
        };
        l.start();
        l
    }

    fn start(&mut self) {
        let mut cmd = Command::new(bin("peerstash"));
        cmd.arg("--home").arg(&self.home).arg("serve");
        self.proc = Some(Proc::spawn("peerstash serve", cmd));
    }

    fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// Where the daemon keeps `c`.
    fn chunk_path(&self, c: &ChunkId) -> PathBuf {
        let hex = c.to_string();
        self.storage.join("chunks").join(&hex[..2]).join(hex)
    }
}

/// Wait (up to 30 s) until the server counts `n` peers online.
async fn wait_online(p: &Peer, n: usize) {
    for _ in 0..300 {
        if p.client.status().await.unwrap().peers_online >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{n} peers did not come online");
}

/// A put of one chunk.
fn put_one(id: ChunkId, size: u32, replicas: u8) -> PutRequest {
    put_req(&[ChunkRef { id, size }], replicas)
}

/// Send `chunks` over QUIC to the target of `pl` under its token: one result per chunk.
async fn upload<B: AsRef<[u8]> + Sync>(
    pc: &PeerClient,
    pl: &peerstash::api::Placement,
    chunks: &[(ChunkId, B)],
) -> Vec<Result<(), PeerError>> {
    let at = PeerAddr::of_placement(pl).await.unwrap();
    pc.put(&at, &pl.token, chunks).await.unwrap()
}

/// Random bytes of `n` and their chunk id.
fn random_chunk(n: usize) -> (ChunkId, Vec<u8>) {
    let mut b = vec![0u8; n];
    peerstash::keys::random_bytes(&mut b).unwrap();
    (ChunkId::of(&b), b)
}

fn run_cli(home: &Path, args: &[&str]) -> Output {
    Command::new(bin("peerstash"))
        .arg("--home")
        .arg(home)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Tests that run a body on one backend: for each `#[ATTR] async fn NAME;` (or `fn NAME;`
/// without `async`), a test `NAME` with that attribute that runs `super::NAME(BACKEND)`.
macro_rules! tests_on {
    (($backend:expr)) => {};
    (($backend:expr) #[$attr:meta] async fn $name:ident; $($rest:tt)*) => {
        #[$attr]
        async fn $name() {
            super::$name($backend).await
        }
        tests_on!(($backend) $($rest)*);
    };
    (($backend:expr) #[$attr:meta] fn $name:ident; $($rest:tt)*) => {
        #[$attr]
        fn $name() {
            super::$name($backend)
        }
        tests_on!(($backend) $($rest)*);
    };
}

/// The tests that run on either backend, each with its own runtime flavour.
macro_rules! tests_on_either_backend {
    ($backend:expr) => {
        tests_on! { ($backend)
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cli_register_with_and_without_invite_login_and_status;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn login_and_registration_are_rate_limited_per_address;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn placement_spreads_replicas_over_distinct_online_peers_with_room;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn over_quota_put_is_refused_with_the_numbers;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn replayed_forged_and_malformed_control_messages_are_refused;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn kill9_and_restart_loses_nothing_committed_and_txids_never_repeat;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn peak_load_mode_issues_universal_tokens_only_when_switched_on;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cli_passphrase_mode_keeps_the_data_key_from_the_server;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn silent_peers_go_offline_and_get_no_placements;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn failed_transfer_frees_its_placement_and_a_new_one_avoids_the_peer;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sealed_roots_only_move_forward_and_the_newest_are_kept;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn earlier_roots_can_be_dropped_but_never_the_latest;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn peak_load_tokens_never_let_one_user_read_or_delete_anothers_chunk;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn made_up_report_reasons_and_ids_do_not_grow_the_metrics;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn malformed_addresses_names_sizes_and_ids_get_a_clear_400;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_chunk_stored_but_never_confirmed_is_reconciled_away_and_nothing_live_is;
            #[tokio::test]
            async fn metrics_are_served_on_their_own_address_only;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn two_instances_on_one_database_share_peers_replays_txids_and_jobs;
            #[test]
            fn instances_started_together_on_a_new_directory_share_one_identity;
        }
    };
}

/// The suite on SQLite, and the tests that need no PostgreSQL: those about SQLite files
/// and `--database` values.
mod sqlite {
    use super::*;

    tests_on_either_backend!(Backend::Sqlite);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn instances_on_copies_of_the_data_directory_share_a_database_given_by_flag() {
        super::instances_on_copies_of_the_data_directory_share_a_database_given_by_flag().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_database_flag_naming_a_data_directory_s_own_file_shares_its_counters() {
        super::a_database_flag_naming_a_data_directory_s_own_file_shares_its_counters().await
    }

    #[test]
    fn a_database_flag_it_cannot_use_is_refused_with_the_reason() {
        super::a_database_flag_it_cannot_use_is_refused_with_the_reason()
    }
}

/// The suite on PostgreSQL, each test on a cluster of its own (about a second to start),
/// and the tests of PostgreSQL only.
mod postgres {
    use super::*;

    tests_on_either_backend!(Backend::postgres());

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn instances_on_copies_of_the_data_directory_share_a_database_given_by_flag() {
        super::instances_on_copies_of_the_data_directory_share_a_postgres_database(
            Backend::postgres(),
        )
        .await
    }

    #[test]
    fn a_postgres_cluster_serves_databases_and_leaves_nothing_behind() {
        super::a_postgres_cluster_serves_databases_and_leaves_nothing_behind()
    }
}

async fn cli_register_with_and_without_invite_login_and_status(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&backend, &tmp.path().join("server"), &[]);
    let fp = s.fingerprint.to_string();
    let pw = tmp.path().join("pw");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    let pw = pw.to_str().unwrap();
    let storage = tmp.path().join("storage");
    let reg = |home: &Path, name: &str, invite: Option<&str>| {
        let mut a = vec![
            "register",
            "--server",
            &s.url,
            "--server-fingerprint",
            &fp,
            "--name",
            name,
            "--password-file",
            pw,
            "--lend",
            "1.5G",
            "--storage-dir",
            storage.to_str().unwrap(),
        ];
        if let Some(i) = invite {
            a.extend(["--invite", i]);
        }
        run_cli(home, &a)
    };

    // Without an invite: refused with the reason and a hint.
    let h1 = tmp.path().join("h1");
    let o = reg(&h1, "ann", None);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("bad_invite"), "{}", stderr(&o));
    assert!(!h1.join("config.toml").exists(), "nothing saved on refusal");

    // With an invite: registered, keys saved 0600.
    let codes = s.invites(2);
    let o = reg(&h1, "ann", Some(&codes[0]));
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(out.contains("1G"), "quota is lend / 1.5: {out}");
    for f in ["transaction.key", "data.key", "peer-key.der", "config.toml"] {
        let mode = std::fs::metadata(h1.join(f)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }

    // The same invite cannot be used twice.
    let o = reg(&tmp.path().join("h2"), "bob", Some(&codes[0]));
    assert!(stderr(&o).contains("bad_invite"), "{}", stderr(&o));
    // A duplicate name is refused, and the second invite is not spent by the refusal.
    let o = reg(&tmp.path().join("h3"), "ann", Some(&codes[1]));
    assert!(stderr(&o).contains("name_taken"), "{}", stderr(&o));
    assert_eq!(s.metric("peerstash_invites_unused", "").await, 1);
    assert_eq!(s.metric("peerstash_peers_registered", "").await, 1);

    // Login with a wrong password is refused; with the right one it restores the keys.
    let bad_pw = tmp.path().join("bad");
    std::fs::write(&bad_pw, "not the password\n").unwrap();
    let h4 = tmp.path().join("h4");
    let login = |pwf: &str| {
        run_cli(
            &h4,
            &[
                "login",
                "--server",
                &s.url,
                "--server-fingerprint",
                &fp,
                "--name",
                "ann",
                "--password-file",
                pwf,
            ],
        )
    };
    let o = login(bad_pw.to_str().unwrap());
    assert!(!o.status.success());
    assert!(stderr(&o).contains("bad_credentials"), "{}", stderr(&o));
    let o = login(pw);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in ["transaction.key", "data.key"] {
        assert_eq!(
            std::fs::read(h1.join(f)).unwrap(),
            std::fs::read(h4.join(f)).unwrap(),
            "login restores {f}"
        );
    }

    // Status through the restored home.
    let o = run_cli(&h4, &["status"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(
        out.contains("ann") && out.contains("of 1 registered"),
        "{out}"
    );

    // A wrong pin never reaches the server.
    let wrong = "ab".repeat(32);
    let o = run_cli(
        &tmp.path().join("h5"),
        &[
            "login",
            "--server",
            &s.url,
            "--server-fingerprint",
            &wrong,
            "--name",
            "ann",
            "--password-file",
            pw,
        ],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("does not match the pinned"),
        "{}",
        stderr(&o)
    );

    // A home that holds no peer cannot serve or mount, and says what to do.
    let empty = tmp.path().join("never-registered");
    for cmd in [&["serve"][..], &["mount", "/nonexistent-mountpoint"][..]] {
        let o = run_cli(&empty, cmd);
        assert!(!o.status.success(), "{cmd:?} succeeded on an empty home");
        assert!(stderr(&o).contains("peerstash register"), "{}", stderr(&o));
    }
}

async fn login_and_registration_are_rate_limited_per_address(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(
        &backend,
        tmp.path(),
        &[
            "--open-registration",
            "--auth-burst",
            "3",
            "--auth-per-minute",
            "1",
        ],
    );
    register(&s, "ann", 100 * MIB).await;
    let c = s.client();
    let wrong = LoginRequest {
        name: "ann".into(),
        password: "wrong password".into(),
    };
    let e = c.login(&wrong).await.unwrap_err();
    assert_eq!(e.reason(), Some("bad_credentials"));
    let e = c.login(&wrong).await.unwrap_err();
    assert_eq!(e.reason(), Some("bad_credentials"));
    let e = c.login(&wrong).await.unwrap_err();
    assert_eq!(
        (e.status(), e.reason()),
        (Some(429), Some("rate_limited")),
        "{e}"
    );
    // Even the right password waits: guessing cannot be sped up.
    let right = LoginRequest {
        name: "ann".into(),
        password: PASSWORD.into(),
    };
    assert_eq!(
        c.login(&right).await.unwrap_err().reason(),
        Some("rate_limited")
    );
}

async fn placement_spreads_replicas_over_distinct_online_peers_with_room(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&backend, tmp.path(), &["--open-registration"]);
    let a = register(&s, "alice", 1 << 30).await;
    let b = register(&s, "bob", 1 << 30).await;
    let c = register(&s, "carol", 1 << 30).await;
    let d = register(&s, "dave", 1 << 30).await;
    let e = register(&s, "erin", 1 << 30).await;
    let f = register(&s, "frank", 1 << 30).await; // never online
    heartbeat(&a, 1 << 30).await;
    for p in [&b, &c, &d] {
        heartbeat(p, 100 * MIB).await;
    }
    heartbeat(&e, MIB).await; // room for exactly one 1 MiB chunk
    let keys: HashMap<PeerId, &TransactionKey> = [&a, &b, &c, &d, &e, &f]
        .iter()
        .map(|p| (p.id, &p.key))
        .collect();

    let batch = chunks("spread", 64, MIB as u32);
    let resp = a.client.put(&put_req(&batch, 2)).await.unwrap();
    assert!(resp.already_stored.is_empty());
    let mut holders: HashMap<ChunkId, Vec<PeerId>> = HashMap::new();
    let mut per_target: HashMap<PeerId, usize> = HashMap::new();
    let mut txids = HashSet::new();
    for pl in &resp.placements {
        assert!(txids.insert(pl.txid), "one transaction id per token");
        assert_ne!(pl.target, a.id, "never the requester");
        assert_ne!(pl.target, f.id, "never an offline peer");
        // The token opens under the target's own key and grants exactly these chunks.
        let auth = TokenVerifier::new(pl.target, keys[&pl.target])
            .open(pl.token.as_bytes(), now_ms() / 1000)
            .unwrap();
        let claims = auth.claims();
        assert_eq!(
            (claims.requester, claims.kind, claims.txid),
            (a.id, TxKind::Put, pl.txid)
        );
        let granted: Vec<ChunkId> = claims.grants.iter().map(|g| g.chunk).collect();
        assert_eq!(granted, pl.chunks);
        // And not under anyone else's.
        assert!(TokenVerifier::new(pl.target, &a.key)
            .open(pl.token.as_bytes(), now_ms() / 1000)
            .is_err());
        *per_target.entry(pl.target).or_default() += pl.chunks.len();
        for ch in &pl.chunks {
            holders.entry(*ch).or_default().push(pl.target);
        }
    }
    assert_eq!(holders.len(), 64);
    for (ch, hs) in &holders {
        let distinct: HashSet<_> = hs.iter().collect();
        assert_eq!(distinct.len(), 2, "two distinct peers for {ch}");
    }
    assert!(
        per_target.get(&e.id).copied().unwrap_or(0) <= 1,
        "erin had room for one"
    );
    // One target per copy (one token, one transfer, one confirm each), among the peers
    // with the most room; the next put ranks them lower by the room this one took.
    assert_eq!(per_target.len(), 2, "{per_target:?}");
    assert!(per_target.values().all(|n| *n == 64), "{per_target:?}");
    assert!(
        per_target.keys().all(|t| [b.id, c.id, d.id].contains(t)),
        "{per_target:?}"
    );
    let next = a
        .client
        .put(&put_req(&chunks("next", 1, MIB as u32), 2))
        .await
        .unwrap();
    assert!(
        next.placements
            .iter()
            .any(|p| !per_target.contains_key(&p.target)),
        "the peer the first put left alone comes first"
    );

    // Exclusion: a peer the client wants to avoid gets nothing.
    let more = chunks("exclude", 4, 1000);
    let mut req = put_req(&more, 2);
    req.exclude = vec![b.id];
    let r = a.client.put(&req).await.unwrap();
    assert!(r.placements.iter().all(|p| p.target != b.id));

    // Too many replicas for the peers online: a clear refusal, nothing recorded.
    let used_before = a.client.status().await.unwrap().used_bytes;
    let err = a
        .client
        .put(&put_req(&chunks("many", 1, 10), 5))
        .await
        .unwrap_err();
    assert_eq!(
        (err.status(), err.reason()),
        (Some(503), Some("not_enough_peers")),
        "{err}"
    );
    assert_eq!(a.client.status().await.unwrap().used_bytes, used_before);

    // Confirms commit only what was placed on the confirming target.
    let first = &resp.placements[0];
    let target = [&b, &c, &d, &e]
        .into_iter()
        .find(|p| p.id == first.target)
        .unwrap();
    let other = [&b, &c, &d]
        .into_iter()
        .find(|p| p.id != first.target)
        .unwrap();
    let stolen = other
        .client
        .confirm(&ConfirmRequest {
            txid: first.txid,
            chunks: first.chunks.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        stolen.committed, 0,
        "another peer cannot confirm someone's placement"
    );
    for pl in &resp.placements {
        let t = [&b, &c, &d, &e]
            .into_iter()
            .find(|p| p.id == pl.target)
            .unwrap();
        let r = t
            .client
            .confirm(&ConfirmRequest {
                txid: pl.txid,
                chunks: pl.chunks.clone(),
            })
            .await
            .unwrap();
        assert_eq!(r.committed, pl.chunks.len());
    }
    assert_eq!(s.metric("peerstash_chunk_locations", "").await, 128);
    assert!(target.client.status().await.unwrap().holding_bytes >= MIB);

    // Dedupe: the same chunks again need nothing sent.
    let again = a.client.put(&put_req(&batch, 2)).await.unwrap();
    assert_eq!(again.already_stored.len(), 64);
    assert!(again.placements.is_empty());

    // Get: the owner gets one token per holder; nobody else gets any.
    let ids: Vec<ChunkId> = batch.iter().map(|c| c.id).collect();
    let got = a
        .client
        .get(&GetRequest {
            chunks: ids.clone(),
        })
        .await
        .unwrap();
    assert!(got.missing.is_empty());
    let mut covered = HashSet::new();
    for pl in &got.placements {
        let auth = TokenVerifier::new(pl.target, keys[&pl.target])
            .open(pl.token.as_bytes(), now_ms() / 1000)
            .unwrap();
        assert_eq!(auth.claims().kind, TxKind::Get);
        assert_eq!(auth.claims().requester, a.id);
        covered.extend(pl.chunks.iter().copied());
    }
    assert_eq!(covered.len(), 64);
    let theirs = b
        .client
        .get(&GetRequest {
            chunks: ids.clone(),
        })
        .await
        .unwrap();
    assert!(
        theirs.placements.is_empty(),
        "no tokens for another user's chunks"
    );
    assert_eq!(theirs.missing.len(), 64);

    // Release: stops counting against the quota; holders learn to drop via heartbeat.
    let before = a.client.status().await.unwrap().used_bytes;
    let rel = a
        .client
        .release(&ReleaseRequest {
            chunks: vec![ids[0]],
        })
        .await
        .unwrap();
    assert_eq!(rel.released, 1);
    assert_eq!(
        a.client.status().await.unwrap().used_bytes,
        before - 2 * MIB
    );
    let mut told = HashSet::new();
    for p in [&b, &c, &d, &e] {
        let drops = heartbeat(p, 100 * MIB).await;
        if drops.contains(&ids[0]) {
            told.insert(p.id);
            let again = heartbeat_ack(p, 100 * MIB, vec![ids[0]]).await;
            assert!(
                !again.contains(&ids[0]),
                "acknowledged drops are not repeated"
            );
        }
    }
    let holders_of_0: HashSet<PeerId> = holders[&ids[0]].iter().copied().collect();
    assert!(told.is_superset(&holders_of_0), "both holders are told");
    // Anyone else told is the peer that confirmed chunks it was never given: it may drop
    // whatever it stored without a placement.
    for extra in told.difference(&holders_of_0) {
        assert_eq!(*extra, other.id);
        assert!(first.chunks.contains(&ids[0]));
    }

    // Failure reports are counted per peer in the metrics.
    a.client
        .report(&ReportRequest::BadChunk {
            holder: c.id,
            chunk: ids[1],
        })
        .await
        .unwrap();
    assert_eq!(
        s.metric("peerstash_reports_total", &format!("peer=\"{}\"", c.id))
            .await,
        1
    );
}

async fn over_quota_put_is_refused_with_the_numbers(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&backend, tmp.path(), &["--open-registration"]);
    let a = register(&s, "alice", 3 * MIB).await; // quota 2 MiB at the default 1.5
    let b = register(&s, "bob", 1 << 30).await;
    let c = register(&s, "carol", 1 << 30).await;
    heartbeat(&b, 1 << 30).await;
    heartbeat(&c, 1 << 30).await;
    let err = a
        .client
        .put(&put_req(&chunks("q", 3, MIB as u32), 1))
        .await
        .unwrap_err();
    assert_eq!(
        (err.status(), err.reason()),
        (Some(507), Some("over_quota")),
        "{err}"
    );
    let msg = err.to_string();
    for n in ["3145728", "2097152", "0 of"] {
        assert!(msg.contains(n), "message names {n}: {msg}");
    }
    let st: StatusResponse = a.client.status().await.unwrap();
    assert_eq!(
        (st.used_bytes, st.quota_bytes),
        (0, 2 * MIB),
        "refusal recorded nothing"
    );
    // Every replica counts: one chunk twice fits, a third replica-MiB does not.
    a.client
        .put(&put_req(&chunks("q", 1, MIB as u32), 2))
        .await
        .unwrap();
    assert_eq!(a.client.status().await.unwrap().used_bytes, 2 * MIB);
    let err = a
        .client
        .put(&put_req(&chunks("r", 1, 1), 1))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), Some("over_quota"));
}

async fn replayed_forged_and_malformed_control_messages_are_refused(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&backend, tmp.path(), &["--open-registration"]);
    let a = register(&s, "alice", 100 * MIB).await;
    let b = register(&s, "bob", 100 * MIB).await;
    heartbeat(&b, 100 * MIB).await;
    let raw = s.client();
    let api_reason = |body: &[u8]| -> String {
        serde_json::from_slice::<peerstash::api::ApiError>(body)
            .unwrap()
            .reason
    };

    // A captured put, sent twice: the second is a replay and changes nothing.
    let body = serde_json::to_vec(&put_req(&chunks("replay", 1, 1000), 1)).unwrap();
    let signer = ControlSigner::new(a.id, &a.key, Direction::PeerToServer);
    let auth = signer.sign(MessageKind::Put, &body, now_ms()).to_header();
    let (st1, _) = raw
        .post_raw("/v1/put", body.clone(), Some(&auth))
        .await
        .unwrap();
    assert_eq!(st1, 200);
    let used = a.client.status().await.unwrap().used_bytes;
    let (st2, resp) = raw
        .post_raw("/v1/put", body.clone(), Some(&auth))
        .await
        .unwrap();
    assert_eq!((st2, api_reason(&resp).as_str()), (401, "replayed"));
    assert_eq!(
        a.client.status().await.unwrap().used_bytes,
        used,
        "the replay recorded nothing"
    );

    // Forged: alice's id, a key that is not hers.
    let forger = ControlSigner::new(
        a.id,
        &TransactionKey::generate().unwrap(),
        Direction::PeerToServer,
    );
    let auth = forger.sign(MessageKind::Put, &body, now_ms()).to_header();
    let (st, resp) = raw
        .post_raw("/v1/put", body.clone(), Some(&auth))
        .await
        .unwrap();
    assert_eq!((st, api_reason(&resp).as_str()), (401, "bad_mac"));

    // Tampered: a valid message over another body.
    let auth = signer.sign(MessageKind::Put, b"{}", now_ms()).to_header();
    let (st, resp) = raw
        .post_raw("/v1/put", body.clone(), Some(&auth))
        .await
        .unwrap();
    assert_eq!((st, api_reason(&resp).as_str()), (401, "bad_mac"));

    // Sent to the wrong endpoint.
    let auth = signer
        .sign(MessageKind::Heartbeat, &body, now_ms())
        .to_header();
    let (st, resp) = raw
        .post_raw("/v1/put", body.clone(), Some(&auth))
        .await
        .unwrap();
    assert_eq!((st, api_reason(&resp).as_str()), (401, "wrong_kind"));

    // Stale: stamped before the server started.
    let auth = signer
        .sign(MessageKind::Put, &body, now_ms() - 3_600_000)
        .to_header();
    let (st, resp) = raw
        .post_raw("/v1/put", body.clone(), Some(&auth))
        .await
        .unwrap();
    assert_eq!((st, api_reason(&resp).as_str()), (401, "stale"));

    // Unknown peer, missing header, garbage header.
    let ghost = ControlSigner::new(PeerId(12345), &a.key, Direction::PeerToServer);
    let auth = ghost.sign(MessageKind::Put, &body, now_ms()).to_header();
    let (st, resp) = raw
        .post_raw("/v1/put", body.clone(), Some(&auth))
        .await
        .unwrap();
    assert_eq!((st, api_reason(&resp).as_str()), (401, "unknown_peer"));
    let (st, resp) = raw.post_raw("/v1/put", body.clone(), None).await.unwrap();
    assert_eq!((st, api_reason(&resp).as_str()), (401, "malformed"));
    let (st, resp) = raw
        .post_raw("/v1/put", body.clone(), Some("zz"))
        .await
        .unwrap();
    assert_eq!((st, api_reason(&resp).as_str()), (401, "malformed"));

    // Oversized body: refused before anything else.
    let big = vec![b' '; peerstash::api::MAX_BODY_BYTES + 1];
    let (st, resp) = raw.post_raw("/v1/put", big, None).await.unwrap();
    assert_eq!((st, api_reason(&resp).as_str()), (413, "too_large"));

    // Authenticated but not JSON.
    let junk = b"not json".to_vec();
    let auth = signer.sign(MessageKind::Put, &junk, now_ms()).to_header();
    let (st, resp) = raw.post_raw("/v1/put", junk, Some(&auth)).await.unwrap();
    assert_eq!((st, api_reason(&resp).as_str()), (400, "bad_json"));

    assert_eq!(
        a.client.status().await.unwrap().used_bytes,
        used,
        "no refusal recorded anything"
    );
    assert_eq!(
        s.metric("peerstash_rejections_total", "reason=\"replayed\"")
            .await,
        1
    );
    assert_eq!(
        s.metric("peerstash_rejections_total", "reason=\"bad_mac\"")
            .await,
        2
    );

    // Bad registrations: a clear 400 with the reason, and no peer is created.
    let bad = |name: &str, password: &str, lend: u64| RegisterRequest {
        name: name.into(),
        password: password.into(),
        invite: None,
        lend_bytes: lend,
        quic_addr: "127.0.0.1:1".into(),
        cert_fingerprint: Fingerprint([0; 32]),
        key_mode: KeyMode::Escrow,
    };
    for (req, reason) in [
        (bad("no spaces", PASSWORD, MIB), "bad_name"),
        (bad(&"x".repeat(65), PASSWORD, MIB), "bad_name"),
        (bad("shorty", "short", MIB), "bad_password"),
        (bad("nolend", PASSWORD, 0), "bad_lend"),
    ] {
        let e = raw.register(&req).await.unwrap_err();
        assert_eq!((e.status(), e.reason()), (Some(400), Some(reason)), "{e}");
    }
    assert_eq!(s.metric("peerstash_peers_registered", "").await, 2);

    // Concurrent requests from one client each get their own channel.
    let futs: Vec<_> = (0..16).map(|_| a.client.status()).collect();
    for r in futures_util::future::join_all(futs).await {
        r.unwrap();
    }
}

async fn kill9_and_restart_loses_nothing_committed_and_txids_never_repeat(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Server::start(&backend, tmp.path(), &["--open-registration"]);
    let a = register(&s, "alice", 1 << 30).await;
    let b = register(&s, "bob", 1 << 30).await;
    let c = register(&s, "carol", 1 << 30).await;
    heartbeat(&b, 1 << 30).await;
    heartbeat(&c, 1 << 30).await;
    let batch = chunks("durable", 8, 4096);
    let resp = a.client.put(&put_req(&batch, 2)).await.unwrap();
    let mut seen_txids: HashSet<u64> = resp.placements.iter().map(|p| p.txid.0).collect();
    // The targets confirm concurrently, one request per chunk (the server commits queued
    // confirms together): every location is committed exactly once.
    let confirms = resp.placements.iter().flat_map(|pl| {
        let t = if pl.target == b.id { &b } else { &c };
        pl.chunks.iter().map(move |ch| {
            let req = ConfirmRequest {
                txid: pl.txid,
                chunks: vec![*ch],
            };
            async move { t.client.confirm(&req).await }
        })
    });
    let committed: usize = futures_util::future::join_all(confirms)
        .await
        .into_iter()
        .map(|r| r.unwrap().committed)
        .sum();
    assert_eq!(committed, 16);
    let got = a
        .client
        .get(&GetRequest {
            chunks: batch.iter().map(|c| c.id).collect(),
        })
        .await
        .unwrap();
    seen_txids.extend(got.placements.iter().map(|p| p.txid.0));

    s.proc.kill9();
    // What the database holds right after the kill: every location, and a txid mark
    // above every id.
    let n = backend.query_i64(tmp.path(), "SELECT COUNT(*) FROM locations");
    assert_eq!(n, 16);
    let hwm = backend.query_i64(tmp.path(), "SELECT value FROM meta WHERE key = 'txid_hwm'");
    assert!(seen_txids.iter().all(|t| (*t as i64) < hwm));
    let s2 = Server::start(&backend, tmp.path(), &["--open-registration"]);
    assert_eq!(
        s2.fingerprint, s.fingerprint,
        "the certificate survives a restart"
    );

    // The same keys still authenticate (kept encrypted at rest), and login returns them.
    let login = s2
        .client()
        .login(&LoginRequest {
            name: "alice".into(),
            password: PASSWORD.into(),
        })
        .await
        .unwrap();
    assert_eq!(login.peer_id, a.id);
    assert_eq!(
        TransactionKey::from_hex(&login.transaction_key).unwrap(),
        a.key
    );
    let a2 = s2.client().with_identity(a.id, a.key.clone());
    let b2 = Peer {
        id: b.id,
        key: b.key.clone(),
        client: s2.client().with_identity(b.id, b.key.clone()),
    };
    let c2 = Peer {
        id: c.id,
        key: c.key.clone(),
        client: s2.client().with_identity(c.id, c.key.clone()),
    };
    heartbeat(&b2, 1 << 30).await;
    heartbeat(&c2, 1 << 30).await;

    let st = a2.status().await.unwrap();
    assert_eq!(
        st.used_bytes,
        8 * 4096 * 2,
        "every committed replica is still counted"
    );
    let ids: Vec<ChunkId> = batch.iter().map(|c| c.id).collect();
    let got = a2
        .get(&GetRequest {
            chunks: ids.clone(),
        })
        .await
        .unwrap();
    assert!(got.missing.is_empty(), "every committed location survived");
    let holders: HashSet<PeerId> = got.placements.iter().map(|p| p.target).collect();
    assert_eq!(holders, HashSet::from([b.id, c.id]));
    let again = a2.put(&put_req(&batch, 2)).await.unwrap();
    assert_eq!(again.already_stored.len(), 8);

    // New transaction ids are all above the ones issued before the crash.
    let max_before = *seen_txids.iter().max().unwrap();
    let fresh = a2
        .put(&put_req(&chunks("after", 4, 4096), 2))
        .await
        .unwrap();
    for p in fresh.placements.iter().chain(got.placements.iter()) {
        assert!(
            p.txid.0 > max_before,
            "txid {} repeats or goes back (max before {max_before})",
            p.txid.0
        );
    }
}

async fn peak_load_mode_issues_universal_tokens_only_when_switched_on(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    for (flag, kind) in [
        (None, TxKind::Put),
        (Some("--peak-load"), TxKind::Universal),
    ] {
        let dir = tmp.path().join(format!("{kind:?}"));
        let mut args = vec!["--open-registration"];
        args.extend(flag);
        let s = Server::start(&backend, &dir, &args);
        let a = register(&s, "alice", 1 << 30).await;
        let b = register(&s, "bob", 1 << 30).await;
        heartbeat(&b, 1 << 30).await;
        let r = a
            .client
            .put(&put_req(&chunks("peak", 2, 100), 1))
            .await
            .unwrap();
        assert_eq!(r.placements.len(), 1);
        let auth = TokenVerifier::new(b.id, &b.key)
            .open(r.placements[0].token.as_bytes(), now_ms() / 1000)
            .unwrap();
        assert_eq!(auth.claims().kind, kind);
        assert_eq!(
            auth.claims().grants.len(),
            2,
            "still limited to the placed chunks"
        );
    }
}

async fn cli_passphrase_mode_keeps_the_data_key_from_the_server(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(
        &backend,
        &tmp.path().join("server"),
        &["--open-registration"],
    );
    let fp = s.fingerprint.to_string();
    let pw = tmp.path().join("pw");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    let phrase = tmp.path().join("phrase");
    std::fs::write(&phrase, "a long recovery passphrase\n").unwrap();
    let (pw, phrase) = (pw.to_str().unwrap(), phrase.to_str().unwrap());
    let h1 = tmp.path().join("h1");
    let o = run_cli(
        &h1,
        &[
            "register",
            "--server",
            &s.url,
            "--server-fingerprint",
            &format!("sha256:{fp}"),
            "--name",
            "pat",
            "--password-file",
            pw,
            "--lend",
            "500M",
            "--storage-dir",
            tmp.path().join("st").to_str().unwrap(),
            "--key-mode",
            "passphrase",
            "--passphrase-file",
            phrase,
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // The server never had the data key: login returns none, the passphrase restores it.
    let login = s
        .client()
        .login(&LoginRequest {
            name: "pat".into(),
            password: PASSWORD.into(),
        })
        .await
        .unwrap();
    assert_eq!(
        (login.key_mode, login.data_key),
        (KeyMode::Passphrase, None)
    );
    let h2 = tmp.path().join("h2");
    let o = run_cli(
        &h2,
        &[
            "login",
            "--server",
            &s.url,
            "--server-fingerprint",
            &fp,
            "--name",
            "pat",
            "--password-file",
            pw,
            "--passphrase-file",
            phrase,
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(h1.join("data.key")).unwrap(),
        std::fs::read(h2.join("data.key")).unwrap()
    );
    // Registering twice into one home is refused before contacting the server.
    let o = run_cli(
        &h1,
        &[
            "register",
            "--server",
            &s.url,
            "--server-fingerprint",
            &fp,
            "--name",
            "pat2",
            "--password-file",
            pw,
            "--lend",
            "1G",
            "--storage-dir",
            "/nonexistent",
        ],
    );
    assert!(
        !o.status.success() && stderr(&o).contains("already holds a peer"),
        "{}",
        stderr(&o)
    );
}

async fn silent_peers_go_offline_and_get_no_placements(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(
        &backend,
        tmp.path(),
        &["--open-registration", "--online-timeout", "1"],
    );
    let a = register(&s, "alice", 1 << 30).await;
    let b = register(&s, "bob", 1 << 30).await;
    heartbeat(&b, 1 << 30).await;
    assert_eq!(a.client.status().await.unwrap().peers_online, 1);
    a.client
        .put(&put_req(&chunks("on", 1, 10), 1))
        .await
        .unwrap();
    // The drive's quota poll leaves out the figures that scan everything stored (absent,
    // not zero); the account numbers are the same.
    let (full, quota) = (
        a.client.status().await.unwrap(),
        a.client.quota().await.unwrap(),
    );
    assert_eq!(full.chunks, Some(0));
    assert!(full.replicas.is_some());
    assert_eq!(
        (quota.chunks, quota.chunks_below_target, quota.replicas),
        (None, None, None)
    );
    assert_eq!(
        (quota.used_bytes, quota.quota_bytes),
        (full.used_bytes, full.quota_bytes)
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(a.client.status().await.unwrap().peers_online, 0);
    let err = a
        .client
        .put(&put_req(&chunks("off", 1, 10), 1))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), Some("not_enough_peers"), "{err}");
    // A heartbeat brings it back.
    heartbeat(&b, 1 << 30).await;
    a.client
        .put(&put_req(&chunks("off", 1, 10), 1))
        .await
        .unwrap();
}

async fn failed_transfer_frees_its_placement_and_a_new_one_avoids_the_peer(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&backend, tmp.path(), &["--open-registration"]);
    let a = register(&s, "alice", 3 * MIB).await;
    let b = register(&s, "bob", 1 << 30).await;
    let c = register(&s, "carol", 1 << 30).await;
    heartbeat(&b, 1 << 30).await;
    heartbeat(&c, 1 << 30).await;
    let one = chunks("retry", 1, MIB as u32);
    let r = a.client.put(&put_req(&one, 1)).await.unwrap();
    let pl = &r.placements[0];
    assert_eq!(a.client.status().await.unwrap().used_bytes, MIB);
    a.client
        .report(&ReportRequest::TransferFailed {
            target: pl.target,
            txid: pl.txid,
            chunks: pl.chunks.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        a.client.status().await.unwrap().used_bytes,
        0,
        "the failed placement no longer counts"
    );
    let mut req = put_req(&one, 1);
    req.exclude = vec![pl.target];
    let again = a.client.put(&req).await.unwrap();
    assert_eq!(again.placements.len(), 1);
    assert_ne!(again.placements[0].target, pl.target);
    // The failed target cannot commit the abandoned placement any more.
    let failed = if pl.target == b.id { &b } else { &c };
    let r = failed
        .client
        .confirm(&ConfirmRequest {
            txid: pl.txid,
            chunks: pl.chunks.clone(),
        })
        .await
        .unwrap();
    assert_eq!(r.committed, 0);
    let labels = format!("peer=\"{}\",kind=\"transfer_failed\"", pl.target);
    assert_eq!(s.metric("peerstash_reports_total", &labels).await, 1);
}

async fn sealed_roots_only_move_forward_and_the_newest_are_kept(backend: Backend) {
    use peerstash::api::{GetRootRequest, PutRootRequest};
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(
        &backend,
        tmp.path(),
        &["--open-registration", "--keep-snapshots", "2"],
    );
    let a = register(&s, "alice", 1 << 30).await;
    let b = register(&s, "bob", 1 << 30).await;
    let none = a.client.get_root(&GetRootRequest::default()).await.unwrap();
    assert!(
        none.root.is_none() && none.kept.is_empty(),
        "a new user has no root"
    );
    let put = |v: u64, body: &str| PutRootRequest {
        version: v,
        sealed: hex::encode(body),
    };
    a.client.put_root(&put(5, "five")).await.unwrap();
    // Not newer: refused, whether equal or older, and the kept root is untouched.
    for v in [5, 4] {
        let err = a.client.put_root(&put(v, "stale")).await.unwrap_err();
        assert_eq!(
            (err.status(), err.reason()),
            (Some(409), Some("stale_root")),
            "{err}"
        );
    }
    a.client.put_root(&put(7, "seven")).await.unwrap();
    let kept = a.client.put_root(&put(9, "nine")).await.unwrap().kept;
    assert_eq!(kept, vec![9, 7], "--keep-snapshots 2 keeps the newest two");
    let latest = a.client.get_root(&GetRootRequest::default()).await.unwrap();
    let root = latest.root.unwrap();
    assert_eq!((root.version, root.sealed), (9, hex::encode("nine")));
    let older = a
        .client
        .get_root(&GetRootRequest { version: Some(7) })
        .await
        .unwrap()
        .root
        .unwrap();
    assert_eq!(older.sealed, hex::encode("seven"));
    let dropped = a
        .client
        .get_root(&GetRootRequest { version: Some(5) })
        .await
        .unwrap();
    assert!(dropped.root.is_none());
    // Roots are per peer: bob sees none of alice's.
    assert!(b
        .client
        .get_root(&GetRootRequest::default())
        .await
        .unwrap()
        .root
        .is_none());
    // Bounded: an oversized root is refused.
    let big = PutRootRequest {
        version: 10,
        sealed: "00".repeat(peerstash::api::MAX_ROOT_BYTES + 1),
    };
    let err = a.client.put_root(&big).await.unwrap_err();
    assert_eq!(err.status(), Some(413), "{err}");
}

async fn earlier_roots_can_be_dropped_but_never_the_latest(backend: Backend) {
    use peerstash::api::{DropRootsRequest, GetRootRequest, PutRootRequest};
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&backend, tmp.path(), &["--open-registration"]);
    let a = register(&s, "alice", 1 << 30).await;
    let b = register(&s, "bob", 1 << 30).await;
    for v in 1..=5u64 {
        let kept = a
            .client
            .put_root(&PutRootRequest {
                version: v,
                sealed: hex::encode(format!("root {v}")),
            })
            .await
            .unwrap()
            .kept;
        assert_eq!(kept.len(), v as usize, "the default cap keeps them all");
    }
    let drop = |versions: Vec<u64>| DropRootsRequest { versions };
    // Unknown versions are ignored; known earlier ones go.
    let kept = a
        .client
        .drop_roots(&drop(vec![2, 4, 99]))
        .await
        .unwrap()
        .kept;
    assert_eq!(kept, vec![5, 3, 1]);
    let gone = a
        .client
        .get_root(&GetRootRequest { version: Some(2) })
        .await
        .unwrap();
    assert!(gone.root.is_none() && gone.kept == vec![5, 3, 1]);
    // The latest never: refused, and nothing is dropped.
    let err = a.client.drop_roots(&drop(vec![1, 5])).await.unwrap_err();
    assert_eq!(
        (err.status(), err.reason()),
        (Some(409), Some("latest_root")),
        "{err}"
    );
    // Another peer's versions are not touched by bob's drop.
    let kept = b.client.drop_roots(&drop(vec![1, 3])).await.unwrap().kept;
    assert!(kept.is_empty());
    let still = a.client.get_root(&GetRootRequest::default()).await.unwrap();
    assert_eq!(still.kept, vec![5, 3, 1]);
    // Bounded.
    let err = a
        .client
        .drop_roots(&drop((0..=peerstash::api::MAX_ROOT_DROP as u64).collect()))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
}

/// Issue 12, item 4. In peak-load mode the server issues universal tokens; a user who
/// knows another user's chunk id and size (any holder of a replica knows both) asks to
/// store "it". The tokens it gets let it neither read nor delete the other user's copy,
/// and a universal token it holds keeps the other user's chunk off that holder.
async fn peak_load_tokens_never_let_one_user_read_or_delete_anothers_chunk(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let args = ["--open-registration", "--heartbeat-interval", "1"];
    let mut s = Server::start(&backend, &tmp.path().join("server"), &args);
    let lenders = [
        Lender::register(&s, tmp.path(), "holder-1"),
        Lender::register(&s, tmp.path(), "holder-2"),
    ];
    let victim = register(&s, "victim", 1 << 30).await;
    let thief = register(&s, "thief", 1 << 30).await;
    wait_online(&victim, 2).await;
    let pc = PeerClient::new().unwrap();
    let key_of = |id: PeerId| {
        let home = &lenders.iter().find(|l| l.id == id).unwrap().home;
        peerstash::client::Home::new(home)
            .load_transaction_key()
            .unwrap()
    };
    let kind_of = |p: &peerstash::api::Placement| {
        TokenVerifier::new(p.target, &key_of(p.target))
            .open(p.token.as_bytes(), now_ms() / 1000)
            .unwrap()
            .claims()
            .kind
    };

    // The victim stores a chunk on one holder; then the operator switches peak-load mode
    // on (a restart, same data and address).
    let (id, secret) = random_chunk(50_000);
    let size = secret.len() as u32;
    let r = victim.client.put(&put_one(id, size, 1)).await.unwrap();
    let pl = &r.placements[0];
    assert_eq!(upload(&pc, pl, &[(id, &secret)]).await, vec![Ok(())]);
    let holder = lenders.iter().find(|l| l.id == pl.target).unwrap();
    let other = lenders.iter().find(|l| l.id != pl.target).unwrap();
    let peak = [
        "--open-registration",
        "--heartbeat-interval",
        "1",
        "--peak-load",
    ];
    s.restart(&peak);
    let client = |p: &Peer| s.client().with_identity(p.id, p.key.clone());
    let (victim, thief) = (client(&victim), client(&thief));
    for _ in 0..300 {
        if victim.status().await.unwrap().peers_online == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The thief asks to store the same id and size on two peers: the holder and the other.
    let r = thief.put(&put_one(id, size, 2)).await.unwrap();
    assert_eq!(r.placements.len(), 2);
    for pl in &r.placements {
        let at = PeerAddr::of_placement(pl).await.unwrap();
        let read = pc.get(&at, &pl.token, &id, size).await;
        assert!(
            !matches!(&read, Ok(b) if b.as_bytes() == &secret[..]),
            "the thief read the victim's ciphertext"
        );
        let deleted = pc.delete(&at, &pl.token, &[(id, size)]).await.unwrap();
        assert!(
            holder.chunk_path(&id).exists(),
            "the thief deleted the victim's chunk"
        );
        if pl.target == holder.id {
            // Where the victim's copy is, a put token only: it stores, it does not read.
            assert_eq!(kind_of(pl), TxKind::Put);
            assert_eq!(read, Err(PeerError::BadToken(TokenReason::WrongType)));
        } else {
            // Elsewhere universal (peak-load mode is on), which still never deletes.
            assert_eq!(kind_of(pl), TxKind::Universal);
            assert_eq!(read, Err(PeerError::NotFound));
        }
        assert_eq!(
            deleted,
            vec![Err(PeerError::BadToken(TokenReason::WrongType))]
        );
    }

    // The victim's copy is untouched on the holder's disk and reads back through the
    // server's listing.
    assert_eq!(std::fs::read(holder.chunk_path(&id)).unwrap(), secret);
    let g = victim.get(&GetRequest { chunks: vec![id] }).await.unwrap();
    assert!(g.missing.is_empty());
    assert_eq!(g.placements.len(), 1);
    let at = PeerAddr::of_placement(&g.placements[0]).await.unwrap();
    assert_eq!(
        pc.get(&at, &g.placements[0].token, &id, size)
            .await
            .unwrap()
            .into_bytes(),
        secret
    );

    // While the thief's universal token for that id on the other peer lasts, the victim's
    // chunk is not placed there (the token would read it): no peer can take a second copy.
    let e = victim.put(&put_one(id, size, 2)).await.unwrap_err();
    assert_eq!(
        (e.status(), e.reason()),
        (Some(503), Some("not_enough_peers"))
    );
    assert!(!other.chunk_path(&id).exists());

    // The same holds the other way round: a new chunk of the victim's, universal for it,
    // keeps the thief (who learns its id) off that holder.
    let (id2, secret2) = random_chunk(1000);
    let r = victim.put(&put_one(id2, 1000, 1)).await.unwrap();
    assert_eq!(kind_of(&r.placements[0]), TxKind::Universal);
    let kept_on = r.placements[0].target;
    let stored = upload(&pc, &r.placements[0], &[(id2, &secret2)]).await;
    assert_eq!(stored, vec![Ok(())]);
    let r = thief.put(&put_one(id2, 1000, 1)).await.unwrap();
    assert_ne!(r.placements[0].target, kept_on);
    let at = PeerAddr::of_placement(&r.placements[0]).await.unwrap();
    assert_eq!(
        pc.get(&at, &r.placements[0].token, &id2, 1000).await,
        Err(PeerError::NotFound)
    );
}

/// Issue 12, item 5. Report reasons are a closed set and report subjects are registered
/// peers: made-up reasons and ids, however many, add no series to `/metrics` and no row
/// to the database.
async fn made_up_report_reasons_and_ids_do_not_grow_the_metrics(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&backend, tmp.path(), &["--open-registration"]);
    let a = register(&s, "alice", 100 * MIB).await;
    let b = register(&s, "bob", 100 * MIB).await;
    let series = |text: &str| -> Vec<String> {
        let mut v: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("peerstash_reports_total{"))
            .map(str::to_string)
            .collect();
        v.sort();
        v
    };
    // Genuine reports about a registered peer.
    a.client
        .report(&ReportRequest::Rejected {
            requester: Some(b.id),
            txid: None,
            reason: "bad_mac".into(),
        })
        .await
        .unwrap();
    a.client
        .report(&ReportRequest::BadChunk {
            holder: b.id,
            chunk: ChunkId::of(b"bad"),
        })
        .await
        .unwrap();
    flood(&a, 0).await;
    // A long reason about the reporter itself.
    a.client
        .report(&ReportRequest::Rejected {
            requester: None,
            txid: None,
            reason: "x".repeat(100_000),
        })
        .await
        .unwrap();
    let text = s.metrics();
    let mut want = vec![
        format!(
            "peerstash_reports_total{{peer=\"{}\",kind=\"rejected\",reason=\"bad_mac\"}} 1",
            b.id
        ),
        format!(
            "peerstash_reports_total{{peer=\"{}\",kind=\"bad_chunk\",reason=\"bad_hash\"}} 1",
            b.id
        ),
        "peerstash_reports_total{peer=\"unknown\",kind=\"rejected\",reason=\"other\"} 100"
            .to_string(),
        "peerstash_reports_total{peer=\"unknown\",kind=\"bad_chunk\",reason=\"bad_hash\"} 100"
            .to_string(),
        format!(
            "peerstash_reports_total{{peer=\"{}\",kind=\"rejected\",reason=\"other\"}} 1",
            a.id
        ),
    ];
    want.sort();
    assert_eq!(series(&text), want);
    assert!(!text.contains("made_up") && !text.contains("xxxx"));
    assert!(!text.contains(&PeerId(0x5eed_0000).to_string()));

    // Another hundred new reasons and ids: the same five series, only the counts move.
    flood(&a, 100).await;
    let text = s.metrics();
    assert_eq!(series(&text).len(), 5);
    assert_eq!(
        s.metric("peerstash_reports_total", "peer=\"unknown\"")
            .await,
        400
    );
    let rows = backend.query_i64(tmp.path(), "SELECT COUNT(*) FROM reports");
    assert_eq!(rows, 5);
}

/// A hundred reports with made-up reasons and requesters, and a hundred about made-up
/// holders, from `p`.
async fn flood(p: &Peer, from: u64) {
    for i in from..from + 100 {
        p.client
            .report(&ReportRequest::Rejected {
                requester: Some(PeerId(0x5eed_0000 + i)),
                txid: None,
                reason: format!("made_up_reason_{i}"),
            })
            .await
            .unwrap();
        p.client
            .report(&ReportRequest::BadChunk {
                holder: PeerId(0xbad_0000 + i),
                chunk: ChunkId::of(&i.to_be_bytes()),
            })
            .await
            .unwrap();
    }
}

/// Issue 12, item 6. Addresses, names, sizes and ids that make no sense are refused with
/// a clear 400 and change nothing; their well-formed neighbours are accepted.
async fn malformed_addresses_names_sizes_and_ids_get_a_clear_400(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(
        &backend,
        tmp.path(),
        &["--open-registration", "--auth-burst", "100"],
    );
    let a = register(&s, "alice", 100 * MIB).await;
    let b = register(&s, "bob", 100 * MIB).await;
    heartbeat(&b, 100 * MIB).await;
    let good_hb = format!("127.0.0.1:{}", 30000 + (b.id.0 % 1000));
    let reg = |name: &str, addr: &str| RegisterRequest {
        name: name.into(),
        password: PASSWORD.into(),
        invite: None,
        lend_bytes: MIB,
        quic_addr: addr.into(),
        cert_fingerprint: Fingerprint([7; 32]),
        key_mode: KeyMode::Escrow,
    };
    let hb = |addr: &str| HeartbeatRequest {
        quic_addr: addr.into(),
        cert_fingerprint: Fingerprint([1; 32]),
        free_bytes: 100 * MIB,
        used_bytes: 0,
        dropped: vec![],
    };
    let refused = |e: peerstash::client::ClientError| (e.status(), e.reason().map(str::to_string));
    let bad_address = (Some(400), Some("bad_address".to_string()));
    for addr in [
        "127.0.0.1:0",
        "127.0.0.1:99999",
        ":1",
        "[::1]:1:2",
        "[::1]:0",
        "::1:7420",
        "127.0.0.1",
        "127.0.0.1:",
        "127.0.0.1:+80",
        "",
        "999.1.1.1:7420",
        "-peer.example.org:7420",
        "peer..example.org:7420",
        "pe er.example.org:7420",
    ] {
        let e = s.client().register(&reg("carol", addr)).await.unwrap_err();
        assert_eq!(refused(e), bad_address, "register with {addr:?}");
        let e = b.client.heartbeat(&hb(addr)).await.unwrap_err();
        assert_eq!(refused(e), bad_address, "heartbeat with {addr:?}");
    }
    for name in [".", "..", ".hidden", "-rf", "_x", ""] {
        let e = s
            .client()
            .register(&reg(name, "127.0.0.1:7420"))
            .await
            .unwrap_err();
        let want = (Some(400), Some("bad_name".to_string()));
        assert_eq!(refused(e), want, "name {name:?}");
    }
    // Nothing was stored: the well-formed neighbours register, and bob's refused
    // heartbeats left the address placements hand out.
    for (i, addr) in [
        "127.0.0.1:7420",
        "[::1]:7420",
        "peer-3.example.org:65535",
        "localhost:1",
    ]
    .iter()
    .enumerate()
    {
        s.client()
            .register(&reg(&format!("carol{i}.x"), addr))
            .await
            .unwrap();
    }
    assert_eq!(a.client.status().await.unwrap().peers_total, 6);
    let placed = a
        .client
        .put(&put_req(&chunks("addr", 1, 1000), 1))
        .await
        .unwrap();
    assert_eq!(placed.placements[0].addr, good_hb);
    let used = a.client.status().await.unwrap().used_bytes;

    // A chunk of zero bytes.
    let e = a
        .client
        .put(&put_req(&chunks("empty", 1, 0), 1))
        .await
        .unwrap_err();
    assert_eq!(refused(e), (Some(400), Some("bad_request".to_string())));
    assert_eq!(a.client.status().await.unwrap().used_bytes, used);

    // Upper-case hex ids (chunks and peers), in every request that names them; the same
    // request in lower case goes through.
    let id = ChunkId::of(b"case").to_string();
    let raw = s.client();
    let alice = ControlSigner::new(a.id, &a.key, Direction::PeerToServer);
    let bob = ControlSigner::new(b.id, &b.key, Direction::PeerToServer);
    let cases = [
        (
            "/v1/put",
            MessageKind::Put,
            &alice,
            serde_json::json!({"chunks": [{"id": id, "size": 1000}], "replicas": 1}),
        ),
        (
            "/v1/put",
            MessageKind::Put,
            &alice,
            serde_json::json!({"chunks": [{"id": ChunkId::of(b"x").to_string(), "size": 1000}], "replicas": 1, "exclude": [a.id.to_string()]}),
        ),
        (
            "/v1/get",
            MessageKind::Get,
            &alice,
            serde_json::json!({"chunks": [id]}),
        ),
        (
            "/v1/release",
            MessageKind::Release,
            &alice,
            serde_json::json!({"chunks": [id]}),
        ),
        (
            "/v1/report",
            MessageKind::Report,
            &alice,
            serde_json::json!({"type": "bad_chunk", "holder": b.id.to_string(), "chunk": id}),
        ),
        (
            "/v1/heartbeat",
            MessageKind::Heartbeat,
            &bob,
            serde_json::json!({"quic_addr": good_hb, "cert_fingerprint": Fingerprint([1; 32]).to_string(), "free_bytes": 100 * MIB, "used_bytes": 0, "dropped": [id]}),
        ),
    ];
    for (path, kind, signer, body) in cases {
        let lower = serde_json::to_vec(&body).unwrap();
        let text = String::from_utf8(lower.clone()).unwrap();
        // Every hex id in the body, upper-cased.
        let mut upper = text.replace(&id, &id.to_uppercase());
        for p in [a.id, b.id] {
            upper = upper.replace(&p.to_string(), &p.to_string().to_uppercase());
        }
        upper = upper.replace(
            &ChunkId::of(b"x").to_string(),
            &ChunkId::of(b"x").to_string().to_uppercase(),
        );
        assert_ne!(upper, text);
        let auth = signer.sign(kind, upper.as_bytes(), now_ms()).to_header();
        let (st, resp) = raw
            .post_raw(path, upper.into_bytes(), Some(&auth))
            .await
            .unwrap();
        let reason = serde_json::from_slice::<peerstash::api::ApiError>(&resp)
            .unwrap()
            .reason;
        assert_eq!((st, reason.as_str()), (400, "bad_json"), "{path} {text}");
        let auth = signer.sign(kind, &lower, now_ms()).to_header();
        let (st, _) = raw.post_raw(path, lower, Some(&auth)).await.unwrap();
        assert_eq!(st, 200, "{path} in lower case");
    }

    // A status request whose `figures` is not a boolean.
    let body = br#"{"figures":"no"}"#.to_vec();
    let auth = alice.sign(MessageKind::Status, &body, now_ms()).to_header();
    let (st, resp) = raw
        .post_raw(peerstash::api::path::STATUS, body, Some(&auth))
        .await
        .unwrap();
    let reason = serde_json::from_slice::<peerstash::api::ApiError>(&resp)
        .unwrap()
        .reason;
    assert_eq!((st, reason.as_str()), (400, "bad_json"));
    // An inventory names 1 to MAX_CHUNKS_PER_REQUEST chunks: none, or one more, is a 400.
    let max = peerstash::api::MAX_CHUNKS_PER_REQUEST;
    let ids = |n: usize| -> Vec<String> {
        (0..n)
            .map(|i| ChunkId::of(&i.to_be_bytes()).to_string())
            .collect()
    };
    for (n, want) in [(0, 400), (max + 1, 400), (max, 200)] {
        let body = serde_json::to_vec(&serde_json::json!({ "chunks": ids(n) })).unwrap();
        let auth = bob
            .sign(MessageKind::Inventory, &body, now_ms())
            .to_header();
        let (st, resp) = raw
            .post_raw(peerstash::api::path::INVENTORY, body, Some(&auth))
            .await
            .unwrap();
        assert_eq!(st, want, "an inventory of {n} chunks");
        if want == 400 {
            let reason = serde_json::from_slice::<peerstash::api::ApiError>(&resp)
                .unwrap()
                .reason;
            assert_eq!(reason, "bad_request", "an inventory of {n} chunks");
        }
    }
}

/// Issue 12, item 9. A daemon stores chunks it cannot confirm (the server is down) and is
/// killed while it retries. Reconciling its inventory with the server afterwards deletes
/// the chunk whose placement the owner gave up, after the grace period; the confirmed
/// chunk and the one whose placement is still pending stay.
async fn a_chunk_stored_but_never_confirmed_is_reconciled_away_and_nothing_live_is(
    backend: Backend,
) {
    let tmp = tempfile::tempdir().unwrap();
    let args = [
        "--open-registration",
        "--heartbeat-interval",
        "1",
        "--reconcile-interval",
        "1",
        "--orphan-grace",
        "3",
    ];
    let mut s = Server::start(&backend, &tmp.path().join("server"), &args);
    let mut holder = Lender::register(&s, tmp.path(), "holder");
    let owner = register(&s, "owner", 1 << 30).await;
    wait_online(&owner, 1).await;
    let pc = PeerClient::new().unwrap();

    // Confirmed: stored, and the server lists it.
    let confirmed = random_chunk(30_000);
    let r = owner
        .client
        .put(&put_one(confirmed.0, 30_000, 1))
        .await
        .unwrap();
    let stored = upload(&pc, &r.placements[0], &[(confirmed.0, &confirmed.1)]).await;
    assert_eq!(stored, vec![Ok(())]);

    // Two more placed; then the server dies, and the holder stores both but cannot
    // confirm them. It is killed while it retries.
    let given_up = random_chunk(20_000);
    let pending = random_chunk(10_000);
    let refs = [
        ChunkRef {
            id: given_up.0,
            size: 20_000,
        },
        ChunkRef {
            id: pending.0,
            size: 10_000,
        },
    ];
    let r = owner.client.put(&put_req(&refs, 1)).await.unwrap();
    let pl = r.placements[0].clone();
    assert_eq!(pl.target, holder.id);
    let at = PeerAddr::of_placement(&pl).await.unwrap();
    s.proc.kill9();
    let upload = {
        // A killed daemon sends no close: give up on its answer after a few seconds
        // rather than the connection's idle timeout.
        let pc = PeerClient::new()
            .unwrap()
            .with_timeout(Duration::from_secs(5));
        let token = pl.token.clone();
        let chunks = vec![given_up.clone(), pending.clone()];
        tokio::spawn(async move { pc.put(&at, &token, &chunks).await })
    };
    for _ in 0..300 {
        if holder.chunk_path(&given_up.0).exists() && holder.chunk_path(&pending.0).exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    holder.kill9();
    let answer = upload.await.unwrap();
    assert!(
        !matches!(&answer, Ok(r) if r.iter().any(|r| r.is_ok())),
        "an unconfirmed chunk is never acknowledged: {answer:?}"
    );
    assert!(
        holder.chunk_path(&given_up.0).exists(),
        "stored before the kill"
    );
    assert!(
        holder.chunk_path(&pending.0).exists(),
        "stored before the kill"
    );

    // Both come back. The owner gives up one chunk of the placement (what the drive
    // reports when a transfer fails); the other's placement is still pending.
    s.restart(&args);
    holder.start();
    let owner = Peer {
        id: owner.id,
        key: owner.key.clone(),
        client: s.client().with_identity(owner.id, owner.key.clone()),
    };
    owner
        .client
        .report(&ReportRequest::TransferFailed {
            target: pl.target,
            txid: pl.txid,
            chunks: vec![given_up.0],
        })
        .await
        .unwrap();

    // The given-up chunk goes once the grace has passed; the others stay, also through
    // further rounds.
    let gone = std::time::Instant::now();
    while holder.chunk_path(&given_up.0).exists() {
        assert!(
            gone.elapsed() < Duration::from_secs(30),
            "the orphaned chunk is still on the holder's disk"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        std::fs::read(holder.chunk_path(&confirmed.0)).unwrap(),
        confirmed.1
    );
    assert_eq!(
        std::fs::read(holder.chunk_path(&pending.0)).unwrap(),
        pending.1
    );
    let g = owner
        .client
        .get(&GetRequest {
            chunks: vec![confirmed.0],
        })
        .await
        .unwrap();
    assert_eq!(g.placements[0].target, holder.id);
}

/// `/metrics` is unauthenticated: it is served on its own address (loopback by default,
/// `--metrics-listen`), not on the public one, unless `--public-metrics` says so.
async fn metrics_are_served_on_their_own_address_only(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&backend, dir.path(), &["--open-registration"]);
    assert!(
        s.metrics_url.starts_with("http://127.0.0.1:"),
        "{}",
        s.metrics_url
    );
    assert!(s.metrics().contains("peerstash_peers_registered"));
    let health = http_get(&s.metrics_url.replace("/metrics", "/healthz"));
    assert_eq!(health, (200, "ok\n".to_string()));
    assert_eq!(
        http_get(&s.metrics_url.replace("/metrics", "/v1/put")).0,
        404
    );
    let public = s.client().metrics().await.unwrap();
    assert!(
        public.contains("not_found") && !public.contains("peerstash_"),
        "{public}"
    );
    drop(s);

    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&backend, dir.path(), &["--public-metrics"]);
    let public = s.client().metrics().await.unwrap();
    assert!(public.contains("peerstash_peers_registered"), "{public}");
    drop(s);

    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&backend, dir.path(), &["--metrics-listen", "off"]);
    assert!(s.metrics_url.is_empty());
    assert!(s.client().metrics().await.unwrap().contains("not_found"));
}

/// Two server instances on one data directory (one database): a peer registered through
/// either is known to both, a control message one accepted is a replay to the other (and
/// so is an older one on the same channel), their transaction ids never collide, and the
/// background jobs run on one instance at a time, moving to the other when it is killed.
async fn two_instances_on_one_database_share_peers_replays_txids_and_jobs(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let s1 = Server::start(&backend, tmp.path(), &["--open-registration"]);
    let s2 = Server::start(&backend, tmp.path(), &["--open-registration"]);
    instances_share_one_database(s1, s2).await;
}

/// The same with `--database sqlite:PATH` outside the data directory, and each instance
/// on its own copy of the data directory (master secret and certificate), as on two
/// service accounts: the database, the control counters and the start-up lock are beside
/// the database file, so everything above holds as well.
async fn instances_on_copies_of_the_data_directory_share_a_database_given_by_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("shared/peerstash.db");
    let flag = format!("sqlite:{}", db.display());
    let args = ["--open-registration", "--database", flag.as_str()];
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let s1 = Server::start(&Backend::Sqlite, &one, &args);
    std::fs::create_dir(&two).unwrap();
    for f in ["master.key", "tls-cert.der", "tls-key.der"] {
        std::fs::copy(one.join(f), two.join(f)).unwrap();
    }
    let s2 = Server::start(&Backend::Sqlite, &two, &args);
    assert_eq!(s1.fingerprint, s2.fingerprint);
    for dir in [&one, &two] {
        assert!(!dir.join("server.db").exists() && !dir.join("channels.db").exists());
    }
    let mode = std::fs::metadata(&db).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the database holds password hashes");
    // `invite` finds the same database through the flag, not through the data directory.
    let out = Command::new(bin("peerstash-server"))
        .args(["invite", "--data-dir"])
        .arg(tmp.path().join("elsewhere"))
        .args(["--database", flag.as_str()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 1);
    let invites: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT COUNT(*) FROM invites", [], |r| r.get(0))
        .unwrap();
    assert_eq!(invites, 1);
    instances_share_one_database(s1, s2).await;
}

/// The same on PostgreSQL: each instance on its own copy of the data directory, both
/// given one database by URL. The data directories keep the master secret and the
/// certificate only; the peers, the control counters and the jobs lease are in the
/// database, so everything above holds as well.
async fn instances_on_copies_of_the_data_directory_share_a_postgres_database(backend: Backend) {
    let Backend::Postgres(pg) = &backend else {
        panic!("a PostgreSQL test")
    };
    let url = pg.create_database("shared");
    let args = ["--open-registration", "--database", url.as_str()];
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let s1 = Server::start(&backend, &one, &args);
    std::fs::create_dir(&two).unwrap();
    for f in ["master.key", "tls-cert.der", "tls-key.der"] {
        std::fs::copy(one.join(f), two.join(f)).unwrap();
    }
    let s2 = Server::start(&backend, &two, &args);
    assert_eq!(s1.fingerprint, s2.fingerprint);
    // `invite` finds the same database through the flag, from any data directory.
    let elsewhere = tmp.path().join("elsewhere");
    let out = Command::new(bin("peerstash-server"))
        .args(["invite", "--data-dir"])
        .arg(&elsewhere)
        .args(["--database", url.as_str()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 1);
    assert_eq!(s2.metric("peerstash_invites_unused", "").await, 1);
    for dir in [&one, &two, &elsewhere] {
        assert_no_sqlite_files(dir);
    }
    instances_share_one_database(s1, s2).await;
}

/// The PostgreSQL harness itself: a cluster starts, makes databases (again is fine) that
/// answer on their URL, and once dropped leaves no process and no file behind, also
/// when the test using it panics.
fn a_postgres_cluster_serves_databases_and_leaves_nothing_behind() {
    let started = Instant::now();
    let pg = PgCluster::start();
    let took = started.elapsed();
    let url = pg.create_database("harness");
    assert_eq!(
        pg.create_database("harness"),
        url,
        "an existing one is fine"
    );
    assert_eq!(
        url,
        format!("postgres://postgres@127.0.0.1:{}/harness", pg.port())
    );
    assert_eq!(pg.query(&url, "SELECT 1").trim(), "1");
    assert_eq!(
        pg.query(&url, "SELECT current_database()").trim(),
        "harness"
    );
    // The postmaster names its data directory on its command line.
    let running = |data: &Path| {
        Command::new("pgrep")
            .arg("-f")
            .arg(data)
            .output()
            .unwrap()
            .status
            .success()
    };
    let data = pg.data_dir();
    assert!(running(&data), "no postgres process for {}", data.display());
    drop(pg);
    assert!(!running(&data), "a postgres process outlived its cluster");
    assert!(!data.exists(), "{} outlived its cluster", data.display());
    eprintln!("a cluster took {took:?} to start");

    // A test that panics with a client connected (a query running): the unwind stops
    // the cluster all the same.
    let (tx, rx) = std::sync::mpsc::channel();
    let failed = std::thread::spawn(move || {
        let pg = PgCluster::start();
        let url = pg.create_database("connected");
        let client = Command::new(pg.bin("psql"))
            .args(["-X", "-q", "-d", &url, "-c", "SELECT pg_sleep(600)"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        tx.send((pg.data_dir(), client)).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        panic!("a test failing while it uses the cluster");
    })
    .join();
    assert!(failed.is_err());
    let (data, mut client) = rx.recv().unwrap();
    assert!(!running(&data), "a postgres process outlived a failed test");
    assert!(!data.exists(), "{} outlived a failed test", data.display());
    // Its client was disconnected.
    let exited = common::wait_for("psql to exit", Duration::from_secs(10), || {
        client.try_wait().unwrap()
    });
    assert!(!exited.success());
}

/// `--database` naming a data directory's own `server.db` (from another data directory,
/// or from that one) shares that directory's control counters: a message accepted by the
/// instance that runs without the flag is a replay to the others. And an instance whose
/// flag names its own default file starts (its start-up lock is taken once, not twice).
async fn a_database_flag_naming_a_data_directory_s_own_file_shares_its_counters() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let s1 = Server::start(&Backend::Sqlite, &one, &["--open-registration"]);
    std::fs::create_dir(&two).unwrap();
    for f in ["master.key", "tls-cert.der", "tls-key.der"] {
        std::fs::copy(one.join(f), two.join(f)).unwrap();
    }
    let flag = format!("sqlite:{}", one.join("server.db").display());
    let s2 = Server::start(&Backend::Sqlite, &two, &["--database", flag.as_str()]);
    let s3 = Server::start(&Backend::Sqlite, &one, &["--database", flag.as_str()]);
    let a = register(&s1, "alice", 1 << 30).await;
    for name in ["bob", "carol"] {
        heartbeat(&register(&s1, name, 1 << 30).await, 1 << 30).await;
    }
    let body = serde_json::to_vec(&put_req(&chunks("once", 1, 1000), 2)).unwrap();
    let auth = ControlSigner::new(a.id, &a.key, Direction::PeerToServer)
        .sign(MessageKind::Put, &body, now_ms())
        .to_header();
    let send = |s: &Server| {
        let (client, body, auth) = (s.client(), body.clone(), auth.clone());
        async move {
            let (st, resp) = client
                .post_raw(peerstash::api::path::PUT, body, Some(&auth))
                .await
                .unwrap();
            (st, String::from_utf8_lossy(&resp).into_owned())
        }
    };
    assert_eq!(send(&s1).await.0, 200);
    for s in [&s2, &s3] {
        let (st, resp) = send(s).await;
        assert!(st == 401 && resp.contains("replayed"), "{st} {resp}");
    }
    assert_no_sqlite_files(&two);
    assert!(!one.join("server.db-channels").exists());
}

/// Unusable `--database` values stop the server before it starts, saying why; so does a
/// PostgreSQL database it cannot reach.
fn a_database_flag_it_cannot_use_is_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    for (value, says) in [
        (
            "mysql://db.example/peerstash",
            "is not a database: use sqlite:PATH",
        ),
        ("sqlite:", "give the database file"),
    ] {
        let out = Command::new(bin("peerstash-server"))
            .arg("--data-dir")
            .arg(tmp.path())
            .args(["--listen", "127.0.0.1:0", "--database", value])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{value}: {err}"
        );
    }
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "nothing made"
    );

    // Nothing listens on the port: the server gives up (it does not wait for ever) and
    // says it was the database. Its own directory: what it makes before it connects is
    // its business.
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/peerstash",
        common::free_tcp_port()
    );
    let mut cmd = Command::new(bin("peerstash-server"));
    cmd.arg("--data-dir")
        .arg(dir.path())
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .args(["--database", &url]);
    let out = output_within(cmd, Duration::from_secs(60));
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        !out.status.success() && (err.contains("database") || err.contains("postgres")),
        "{url}: {:?} {err}",
        out.status
    );
}

/// Run `cmd` to the end and collect its output; kill it and fail if it takes longer than
/// `timeout`.
fn output_within(mut cmd: Command, timeout: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    // Collecting both pipes while waiting is what `wait_with_output` does; it blocks, so
    // it runs aside and the timeout is kept here.
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!("{cmd:?} still running after {timeout:?}");
        }
    }
}

/// What [`two_instances_on_one_database_share_peers_replays_txids_and_jobs`] shows, for
/// two instances however they share their database.
async fn instances_share_one_database(s1: Server, s2: Server) {
    let a = register(&s1, "alice", 1 << 30).await;
    let b = register(&s2, "bob", 1 << 30).await;
    let c = register(&s1, "carol", 1 << 30).await;
    // Each peer through the instance it did not register with.
    let other = |s: &Server, p: &Peer| Peer {
        id: p.id,
        key: p.key.clone(),
        client: s.client().with_identity(p.id, p.key.clone()),
    };
    let (b1, c2) = (other(&s1, &b), other(&s2, &c));
    heartbeat(&b1, 1 << 30).await;
    heartbeat(&c2, 1 << 30).await;
    assert_eq!(
        other(&s2, &a).client.status().await.unwrap().peers_online,
        2
    );

    let reason = |body: &[u8]| -> String {
        serde_json::from_slice::<peerstash::api::ApiError>(body)
            .unwrap()
            .reason
    };
    let signer = ControlSigner::new(a.id, &a.key, Direction::PeerToServer);
    let put = |tag: &str| serde_json::to_vec(&put_req(&chunks(tag, 1, 1000), 2)).unwrap();
    let (early, late) = (put("early"), put("late"));
    let early_auth = signer.sign(MessageKind::Put, &early, now_ms()).to_header();
    let late_auth = signer.sign(MessageKind::Put, &late, now_ms()).to_header();
    // Accepted by one instance, a replay to the other.
    let (st, _) = s1
        .client()
        .post_raw(peerstash::api::path::PUT, late.clone(), Some(&late_auth))
        .await
        .unwrap();
    assert_eq!(st, 200);
    let (st, resp) = s2
        .client()
        .post_raw(peerstash::api::path::PUT, late, Some(&late_auth))
        .await
        .unwrap();
    assert_eq!((st, reason(&resp).as_str()), (401, "replayed"));
    // An earlier message on the same channel, never sent before: too late on either.
    let (st, resp) = s2
        .client()
        .post_raw(peerstash::api::path::PUT, early, Some(&early_auth))
        .await
        .unwrap();
    assert_eq!((st, reason(&resp).as_str()), (401, "replayed"));

    // Puts through both instances, in turn: every transaction id is handed out once.
    let mut txids = HashSet::new();
    let mut placements = 0;
    for i in 0..8 {
        let via = if i % 2 == 0 { &s1 } else { &s2 };
        let resp = other(via, &a)
            .client
            .put(&put_req(&chunks(&format!("turn-{i}"), 3, 1000), 2))
            .await
            .unwrap();
        placements += resp.placements.len();
        txids.extend(resp.placements.iter().map(|p| p.txid.0));
    }
    assert_eq!(placements, 16, "two targets per put");
    assert_eq!(
        txids.len(),
        placements,
        "a transaction id was handed out twice"
    );

    // The first instance took the jobs lease; killed, the other takes over.
    let leader = |s: &Server| -> String {
        let m = s.metrics();
        let v = m
            .lines()
            .find_map(|l| l.strip_prefix("peerstash_jobs_leader "));
        v.unwrap_or_else(|| panic!("no peerstash_jobs_leader in\n{m}"))
            .to_string()
    };
    assert_eq!((leader(&s1), leader(&s2)), ("1".into(), "0".into()));
    drop(s1);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while leader(&s2) != "1" {
        assert!(
            std::time::Instant::now() < deadline,
            "the surviving instance never took over the background jobs"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // And it serves everyone on its own.
    heartbeat(&other(&s2, &b), 1 << 30).await;
    assert!(c2.client.status().await.is_ok());
}

/// Two instances started at once on a new data directory: the first makes the master
/// secret and the certificate, the other reads them (one fingerprint for clients to pin,
/// one key for the peers' keys at rest).
fn instances_started_together_on_a_new_directory_share_one_identity(backend: Backend) {
    for _ in 0..3 {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let starts: Vec<_> = (0..2)
            .map(|_| {
                let (backend, dir) = (backend.clone(), dir.clone());
                std::thread::spawn(move || Server::start(&backend, &dir, &[]))
            })
            .collect();
        let servers: Vec<Server> = starts.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(servers[0].fingerprint, servers[1].fingerprint);
    }
}

/// `dir` (if it exists) holds no database or counters file of its own.
fn assert_no_sqlite_files(dir: &Path) {
    let names: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("server.db") || n.starts_with("channels")),
        "{}: {names:?}",
        dir.display()
    );
}
