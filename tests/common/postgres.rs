//! A throwaway PostgreSQL cluster for the tests that run the server on PostgreSQL: the
//! distribution's binaries, a fresh data directory in a temporary directory, a `postgres`
//! process of the test's own on a free loopback port, stopped and deleted when dropped.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Where Debian's `postgresql-NN` packages put their server binaries.
const PG_LIB: &str = "/usr/lib/postgresql";
/// The superuser `initdb` creates; trusted on loopback, so no password anywhere.
const SUPERUSER: &str = "postgres";
/// How long a new cluster may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a fast shutdown may take before the postmaster is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running PostgreSQL cluster of the test's own, on 127.0.0.1 with trust
/// authentication for [`SUPERUSER`]. Dropping it stops the server (also when the test
/// panics: `Drop` runs on unwind) and deletes its files.
pub struct PgCluster {
    /// The postmaster, a direct child (not daemonized by `pg_ctl`), so its PID is known
    /// and nothing outlives the test.
    server: Child,
    /// The TCP port it listens on (loopback only).
    port: u16,
    /// The directory with `initdb`, `postgres`, `psql` and `pg_isready`.
    bin: PathBuf,
    /// Holds the cluster's data directory (`data`), its Unix socket and its log; deleted
    /// on drop, after the server has stopped. `None` only while dropping.
    dir: Option<tempfile::TempDir>,
    /// Held while a database is created: servers started together on one data directory
    /// ask for the same database at the same time, and of two `CREATE DATABASE` of one
    /// name at once the second may fail on the catalog's unique index instead of saying
    /// "already exists".
    creating: Mutex<()>,
}

impl PgCluster {
    /// Make a new cluster and start it; returns once it accepts connections.
    ///
    /// Panics when PostgreSQL is not installed, saying which package to install.
    pub fn start() -> PgCluster {
        let bin = pg_bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("peerstash-pg-")
            .tempdir()
            .expect("a temporary directory for PostgreSQL");
        let owner = unprivileged_owner();
        if let Some((uid, gid)) = owner {
            // initdb and postgres refuse to run as root: as root (the CI runs the tests
            // so, for FUSE and namespaces) both run as `nobody`, who must own the files.
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .expect("chown the PostgreSQL directory to nobody");
        }
        let data = dir.path().join("data");
        let out = as_owner(Command::new(bin.join("initdb")), owner, dir.path())
            .arg("-D")
            .arg(&data)
            .args(["-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-sync"])
            // Independent of the machine's locale settings (a LANG naming a locale that
            // is not generated makes initdb fail).
            .arg("--locale=C")
            .stdin(Stdio::null())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // A port picked free can be taken by another test before postgres binds it: try
        // again with another when the postmaster exits for that before it is ready.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = super::free_tcp_port();
            let mut server = spawn_postmaster(&bin, dir.path(), port, owner);
            let exited = match wait_ready(&bin, port, &mut server) {
                Ok(()) => {
                    return PgCluster {
                        server,
                        port,
                        bin,
                        dir: Some(dir),
                        creating: Mutex::new(()),
                    }
                }
                Err(exited) => exited,
            };
            let log = fs::read_to_string(dir.path().join("postgres.log")).unwrap_or_default();
            let port_taken = log.contains("could not bind") || log.contains("already in use");
            if exited.is_some() && port_taken && attempt < 3 {
                continue;
            }
            stop(&mut server);
            panic!("PostgreSQL did not start on port {port} ({exited:?}); its log:\n{log}");
        }
    }

    /// The port the cluster listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's data directory (its `postgres` process names it on its command line).
    pub fn data_dir(&self) -> PathBuf {
        self.dir().join("data")
    }

    /// The URL of database `name` as the server's `--database` takes it.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{name}", self.port)
    }

    /// Create database `name` (an existing one is fine: instances on one data directory
    /// share it) and return its URL. The server creates its schema itself but not the
    /// database.
    ///
    /// `name` is letters, digits, `_` and `-` only, so the URL needs no escaping.
    pub fn create_database(&self, name: &str) -> String {
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "database name {name:?}: use letters, digits, _ and - only"
        );
        let _one_at_a_time = self.creating.lock().unwrap_or_else(|e| e.into_inner());
        let out = self.psql(
            &self.url("postgres"),
            &format!("CREATE DATABASE \"{name}\""),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() || err.contains("already exists"),
            "CREATE DATABASE {name}: {err}"
        );
        self.url(name)
    }

    /// The path of one of PostgreSQL's programs (`psql`, `pg_dump`, ...) of the version
    /// the cluster runs.
    pub fn bin(&self, program: &str) -> PathBuf {
        self.bin.join(program)
    }

    /// Run `sql` with `psql` on the database at `url` (a URL from [`Self::url`]) and
    /// return its output: unaligned, tuples only, one row a line. Panics when it fails.
    pub fn query(&self, url: &str, sql: &str) -> String {
        let out = self.psql(url, sql);
        assert!(
            out.status.success(),
            "psql {url} -c {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `psql` on `url` with one command, stopping at the first error.
    fn psql(&self, url: &str, sql: &str) -> Output {
        Command::new(self.bin.join("psql"))
            // No ~/.psqlrc: its settings would change the output.
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-d", url, "-c", sql])
            .stdin(Stdio::null())
            .output()
            .expect("run psql")
    }

    /// The temporary directory that holds everything of the cluster.
    fn dir(&self) -> &Path {
        self.dir.as_ref().expect("not dropped").path()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        stop(&mut self.server);
        if std::thread::panicking() {
            // The failing test's output then shows what PostgreSQL had to say.
            let log = fs::read_to_string(self.dir().join("postgres.log")).unwrap_or_default();
            eprintln!("--- PostgreSQL log of the failed test ---\n{log}");
        }
        // Deleted only now: the server is down, so it writes nothing more there.
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
    }
}

/// The `bin` directory of the newest PostgreSQL installed under [`PG_LIB`].
fn pg_bin_dir() -> PathBuf {
    let newest = fs::read_dir(PG_LIB)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version);
    match newest {
        Some((_, bin)) => bin,
        None => panic!(
            "the PostgreSQL tests need PostgreSQL (apt-get install postgresql): no {PG_LIB}/*/bin/postgres"
        ),
    }
}

/// `Some((uid, gid))` of `nobody` when the tests run as root (PostgreSQL refuses root),
/// `None` when they run as an ordinary user, who runs it directly.
fn unprivileged_owner() -> Option<(u32, u32)> {
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, "nobody"])
            .output()
            .expect("run id");
        assert!(
            out.status.success(),
            "the PostgreSQL tests run as root need the user nobody"
        );
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    Some((id("-u"), id("-g")))
}

/// `cmd` set to run as `owner` (when given) from `cwd`. The switch is made by the child
/// itself before it executes the binary (no `runuser` in between), so the child's PID is
/// the binary's; the working directory is one the user can enter.
fn as_owner(mut cmd: Command, owner: Option<(u32, u32)>, cwd: &Path) -> Command {
    if let Some((uid, gid)) = owner {
        // As root, std also drops the supplementary groups before switching.
        cmd.uid(uid).gid(gid);
    }
    cmd.current_dir(cwd);
    cmd
}

/// Start the postmaster of the cluster in `dir` on 127.0.0.1:`port`; its log goes to
/// `dir/postgres.log` (not the test's output: it is chatty on every start and stop).
fn spawn_postmaster(bin: &Path, dir: &Path, port: u16, owner: Option<(u32, u32)>) -> Child {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("postgres.log"))
        .expect("open the PostgreSQL log");
    as_owner(Command::new(bin.join("postgres")), owner, dir)
        .arg("-D")
        .arg(dir.join("data"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        // The Unix socket in the test's directory, not /var/run/postgresql (which may not
        // exist, or belong to the machine's own cluster).
        .arg("-k")
        .arg(dir)
        // Room for several server instances' pools at once; little memory per cluster,
        // as tests run several clusters side by side.
        .args(["-c", "max_connections=200", "-c", "shared_buffers=32MB"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("the PostgreSQL log"))
        .stderr(log)
        .spawn()
        .expect("start postgres")
}

/// Wait until the postmaster accepts connections on `port`. `Err` when it does not:
/// with its exit status when it exited, `None` when it timed out.
fn wait_ready(
    bin: &Path,
    port: u16,
    server: &mut Child,
) -> Result<(), Option<std::process::ExitStatus>> {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = server.try_wait() {
            return Err(Some(status));
        }
        let ready = Command::new(bin.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-U", SUPERUSER, "-d", "postgres"])
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ready {
            return Ok(());
        }
        if start.elapsed() > READY_TIMEOUT {
            return Err(None);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Stop the postmaster and reap it. SIGINT is PostgreSQL's fast shutdown: it disconnects
/// the clients still there (SIGTERM, the smart shutdown, would wait for them to leave)
/// and waits for its own processes to end. SIGKILL after [`STOP_TIMEOUT`]; its backends
/// then notice the postmaster is gone and exit by themselves.
fn stop(server: &mut Child) {
    if let Ok(Some(_)) = server.try_wait() {
        return;
    }
    unsafe { libc::kill(server.id() as libc::pid_t, libc::SIGINT) };
    let start = Instant::now();
    while start.elapsed() < STOP_TIMEOUT {
        if let Ok(Some(_)) = server.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = server.kill();
    let _ = server.wait();
}
