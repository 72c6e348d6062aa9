//! Packaging: the example config files are complete and load (flags override them), the
//! mount helper maps mount(8)/fstab options, the drive's `ro`/`uid=`/`gid=` options work
//! on a real FUSE mount, and the systemd units pass `systemd-analyze verify`.
//! The Debian package itself is tested by `packaging/test-deb.sh` (root, cargo-deb).

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{bin, wait_for, Proc};
use peerstash::drive::{mount, DirBackend, DriveConfig};
use peerstash::DataKey;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The example file with every `# key = value` line uncommented.
fn uncommented(example: &str) -> String {
    let text = fs::read_to_string(repo().join("packaging").join(example)).unwrap();
    text.lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest) if is_setting(rest) => rest.to_string(),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_setting(line: &str) -> bool {
    line.split_once(" = ").is_some_and(|(k, _)| {
        !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
    })
}

/// The long flags a `--help` text lists (minus help, version and config).
fn flags(help: &str) -> BTreeSet<String> {
    help.split_whitespace()
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .replace('-', "_")
        })
        .filter(|w| !w.is_empty() && !["help", "version", "config"].contains(&w.as_str()))
        .collect()
}

fn output(cmd: &mut Command) -> (bool, String) {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}

/// Every value in a TOML table: key -> value, for one table of the example.
fn keys(toml_text: &str, section: Option<&str>) -> BTreeSet<String> {
    let table: toml::Table = toml_text.parse().unwrap();
    let t = match section {
        Some(s) => table[s].as_table().unwrap().clone(),
        None => table,
    };
    t.iter()
        .filter(|(_, v)| !v.is_table())
        .map(|(k, _)| k.clone())
        .collect()
}

#[test]
fn server_example_config_lists_every_flag_and_flags_override_it() {
    let text = uncommented("peerstash-server.toml");
    let (_, help) = output(Command::new(bin("peerstash-server")).arg("--help"));
    assert_eq!(
        keys(&text, None),
        flags(&help),
        "server options vs the example"
    );

    // Every default in the example loads; --data-dir on the command line wins.
    let dir = tempfile::tempdir().unwrap();
    let from_file = dir.path().join("from-file");
    let from_flag = dir.path().join("from-flag");
    let db = dir.path().join("db/server.db");
    let cfg: String = text
        .lines()
        .filter(|l| !l.starts_with("tls_"))
        .map(|l| {
            if l.starts_with("data_dir") {
                format!("data_dir = {:?}", from_file.to_str().unwrap())
            } else if l.starts_with("listen") {
                "listen = \"127.0.0.1:0\"".into()
            } else if l.starts_with("database") {
                format!("database = \"sqlite:{}\"", db.display())
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let file = dir.path().join("server.toml");
    fs::write(&file, cfg).unwrap();
    let out = dir.path().join("out");
    let mut cmd = Command::new(bin("peerstash-server"));
    cmd.arg("--config")
        .arg(&file)
        .arg("--data-dir")
        .arg(&from_flag)
        .env_remove("PEERSTASH_SERVER_DATA")
        .stdout(fs::File::create(&out).unwrap());
    let _server = Proc::spawn("server", cmd);
    wait_for("server start-up", Duration::from_secs(30), || {
        fs::read_to_string(&out)
            .unwrap()
            .contains("listening: https://127.0.0.1:")
            .then_some(())
    });
    assert!(from_flag.join("master.key").exists());
    assert!(db.exists(), "the file's database setting is used");
    assert!(!from_flag.join("server.db").exists());
    assert!(!from_file.exists(), "the flag overrides data_dir");

    // A key the server does not know is a clear error.
    fs::write(&file, "listen = \"127.0.0.1:0\"\nlisten_adress = \"x\"\n").unwrap();
    let (ok, msg) = output(
        Command::new(bin("peerstash-server"))
            .arg("--config")
            .arg(&file),
    );
    assert!(
        !ok && msg.contains("unknown option \"listen_adress\""),
        "{msg}"
    );
}

#[test]
fn client_example_config_lists_every_flag_and_flags_override_it() {
    let text = uncommented("peerstash.toml");
    let (_, help) = output(Command::new(bin("peerstash")).arg("--help"));
    assert_eq!(keys(&text, None), flags(&help), "global options");
    for sub in ["register", "login", "mount", "local-cluster"] {
        let (_, help) = output(Command::new(bin("peerstash")).args([sub, "--help"]));
        let mut want = flags(&help);
        want.remove("home");
        if sub == "mount" {
            want.insert("mountpoint".into());
            want.insert("options".into()); // -o
        }
        assert_eq!(keys(&text, Some(sub)), want, "[{sub}] options");
    }

    // The whole example loads (all sections and keys known, values valid).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("peerstash.toml");
    fs::write(&file, &text).unwrap();
    let (ok, msg) = output(
        Command::new(bin("peerstash"))
            .arg("--config")
            .arg(&file)
            .args(["mount", "--help"]),
    );
    assert!(ok, "{msg}");

    // home comes from the file, --home overrides it.
    let home = dir.path().join("home-from-file");
    fs::write(&file, format!("home = {:?}\n", home.to_str().unwrap())).unwrap();
    let (ok, msg) = output(
        Command::new(bin("peerstash"))
            .env_remove("PEERSTASH_HOME")
            .arg("--config")
            .arg(&file)
            .arg("status"),
    );
    assert!(
        !ok && msg.contains(&format!("{} holds no peer", home.display())),
        "{msg}"
    );
    let other = dir.path().join("home-from-flag");
    let (ok, msg) = output(
        Command::new(bin("peerstash"))
            .env_remove("PEERSTASH_HOME")
            .env("PEERSTASH_CONFIG", &file)
            .arg("--home")
            .arg(&other)
            .arg("status"),
    );
    assert!(
        !ok && msg.contains(&format!("{} holds no peer", other.display())),
        "{msg}"
    );

    fs::write(&file, "[mount]\nopts = \"ro\"\n").unwrap();
    let (ok, msg) = output(
        Command::new(bin("peerstash"))
            .arg("--config")
            .arg(&file)
            .arg("status"),
    );
    assert!(
        !ok && msg.contains("unknown option \"opts\" in [mount]"),
        "{msg}"
    );
}

#[test]
fn mount_options_from_fstab_and_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir.path().join("mnt"), dir.path());
    cfg.apply_options(
        "rw,_netdev,noauto,nofail,x-systemd.automount,x-systemd.idle-timeout=60,user,dev,\
         suid,exec,relatime,comment=backup,ro,uid=1234,gid=5678,default_permissions,\
         cache_size=32M,allow_other,fsname=/var/lib/peerstash/default",
    )
    .unwrap();
    assert!(cfg.read_only && cfg.allow_other);
    assert_eq!((cfg.uid, cfg.gid), (Some(1234), Some(5678)));
    assert_eq!(cfg.options.cache_bytes, 32 << 20);
    assert_eq!(cfg.fsname, "/var/lib/peerstash/default");
    cfg.apply_options("cache_size=1048576").unwrap();
    assert_eq!(cfg.options.cache_bytes, 1 << 20);
    assert!(cfg.apply_options("uid=alice").unwrap_err().contains("uid"));
    assert!(cfg.apply_options("cache_size=lots").is_err());
    assert!(cfg.apply_options("fsname=").is_err());
    assert!(cfg.apply_options("allow_root").is_err());
}

fn config(mnt: &Path, state: &Path) -> DriveConfig {
    fs::create_dir_all(state.join("backend")).unwrap();
    let backend = Arc::new(DirBackend::open(&state.join("backend"), 1 << 30).unwrap());
    DriveConfig::new(
        mnt,
        state.join("drive"),
        DataKey::from_bytes([7; 32]),
        backend,
    )
}

/// The helper's mapping, by its dry run (`-f -v` prints the command it would run).
#[test]
fn mount_helper_maps_options() {
    let helper = repo().join("packaging/mount.fuse.peerstash");
    let dir = tempfile::tempdir().unwrap();
    let (home, mnt) = (dir.path().join("home"), dir.path().join("mnt"));
    fs::create_dir_all(&home).unwrap();
    fs::create_dir_all(&mnt).unwrap();
    let run = |args: &[&str]| {
        output(
            Command::new("sh")
                .arg(&helper)
                .arg(&home)
                .arg(&mnt)
                .args(args)
                .env("PEERSTASH_BIN", bin("peerstash")),
        )
    };
    let (ok, msg) = run(&[
        "-fv",
        "-o",
        "rw,_netdev,noauto,nofail,x-systemd.automount,user,dev,suid,exec,allow_other,ro,uid=root,gid=0,default_permissions,cache_size=128M",
        "-t",
        "fuse.peerstash",
    ]);
    assert!(ok, "{msg}");
    let want = format!(
        "mount.fuse.peerstash: {} --home {} mount {} --daemon -o allow_other,ro,uid=0,gid=0,default_permissions,cache_size=128M,fsname={}",
        bin("peerstash").display(),
        home.display(),
        mnt.display(),
        home.display()
    );
    assert_eq!(msg.trim(), want);

    let (ok, msg) = run(&["-f", "-v", "-o", "setuid=nobody,defaults"]);
    assert!(ok, "{msg}");
    assert!(
        msg.trim()
            .starts_with("mount.fuse.peerstash: runuser -u nobody -- ")
            || msg.contains("setuid= needs root"),
        "{msg}"
    );

    let (ok, msg) = run(&["-f", "-o", "uid=no-such-user-here"]);
    assert!(!ok && msg.contains("no such user"), "{msg}");
    let (ok, msg) = output(
        Command::new("sh")
            .arg(&helper)
            .arg(dir.path().join("missing"))
            .arg(&mnt)
            .env("PEERSTASH_BIN", bin("peerstash")),
    );
    assert!(
        !ok && msg.contains("no such peerstash home directory"),
        "{msg}"
    );
}

fn has_fuse() -> bool {
    Path::new("/dev/fuse").exists()
        && Command::new("fusermount3")
            .arg("--version")
            .output()
            .is_ok()
}

/// `ro`, `uid=`, `gid=` on a real FUSE mount (backend: a local directory).
#[test]
fn read_only_and_owner_options_on_a_real_mount() {
    if !has_fuse() {
        println!("SKIPPED: no /dev/fuse or fusermount3");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();

    let handle = mount(config(&mnt, dir.path())).unwrap();
    fs::write(mnt.join("kept.txt"), b"written before the ro mount").unwrap();
    fs::create_dir(mnt.join("sub")).unwrap();
    handle.unmount().unwrap();

    let mut cfg = config(&mnt, dir.path());
    cfg.apply_options("ro,uid=4321,gid=8765").unwrap();
    let handle = mount(cfg).unwrap();
    assert_eq!(
        fs::read(mnt.join("kept.txt")).unwrap(),
        b"written before the ro mount"
    );
    for p in [mnt.clone(), mnt.join("kept.txt"), mnt.join("sub")] {
        let m = fs::metadata(&p).unwrap();
        assert_eq!((m.uid(), m.gid()), (4321, 8765), "{}", p.display());
    }
    let erofs = |r: std::io::Result<()>| {
        let e = r.expect_err("a change on a read-only mount");
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    };
    erofs(fs::write(mnt.join("new.txt"), b"x"));
    erofs(fs::write(mnt.join("kept.txt"), b"x"));
    erofs(fs::create_dir(mnt.join("newdir")));
    erofs(fs::remove_file(mnt.join("kept.txt")));
    erofs(fs::rename(mnt.join("kept.txt"), mnt.join("moved.txt")));
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.contains(mnt.to_str().unwrap()))
        .expect("the mount in mountinfo");
    assert!(line.contains(" ro,") || line.contains(" ro "), "{line}");
    handle.unmount().unwrap();
    assert!(!mnt.join("kept.txt").exists(), "unmounted");
}

/// `systemd-analyze verify` on every unit, with ExecStart pointing at the built binaries
/// (the packaged paths are verified by packaging/test-deb.sh after `dpkg -i`).
#[test]
fn systemd_units_verify() {
    let ok = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        println!("SKIPPED: systemd-analyze is not installed (apt-get install systemd)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let units = repo().join("packaging/systemd");
    let mut names = Vec::new();
    for e in fs::read_dir(&units).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        let text = fs::read_to_string(e.path())
            .unwrap()
            .replace(
                "/usr/bin/peerstash-server",
                bin("peerstash-server").to_str().unwrap(),
            )
            .replace(
                "/usr/bin/peerstash ",
                &format!("{} ", bin("peerstash").display()),
            );
        fs::write(dir.path().join(&name), text).unwrap();
        if name.ends_with("@.service") {
            let inst = name.replace("@.", "@alice.");
            std::os::unix::fs::symlink(&name, dir.path().join(&inst)).unwrap();
            names.push(inst);
        } else {
            names.push(name);
        }
    }
    names.sort();
    assert_eq!(names.len(), 5, "{names:?}");
    let (ok, msg) = output(
        Command::new("systemd-analyze")
            .current_dir(dir.path())
            .args(["verify", "--man=no"])
            .args(&names),
    );
    assert!(
        ok && msg.trim().is_empty(),
        "systemd-analyze verify:\n{msg}"
    );
}
