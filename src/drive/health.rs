//! The uploader's health, published for `peerstash status --wait` (another process): a
//! small text file `upload-health` in the drive's state directory, rewritten atomically
//! when the state changes and every few seconds as a heartbeat. A missing or stale file
//! means no drive is mounted, so nothing uploads.
//!
//! Format: `key=value` lines — `state` (`ok`, `over_quota`, `unavailable`, `failing`),
//! `since` and `updated` (Unix seconds), `detail` (one line, at most [`MAX_DETAIL`] bytes).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The file's name in the drive's state directory.
pub const FILE: &str = "upload-health";
/// How often a mounted drive rewrites the file even when nothing changes.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// Longest detail kept.
pub const MAX_DETAIL: usize = 300;
/// Largest file read back (anything longer is not ours).
const MAX_FILE: u64 = 4096;

/// What the uploader is doing about the files waiting for upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadState {
    /// Uploading, or nothing to do.
    Ok,
    /// Refused over quota, and nothing more can be given back.
    OverQuota,
    /// The server or the peers cannot be reached; retried with backoff.
    Unavailable,
    /// A local failure (staging or index); retried.
    Failing,
}

impl UploadState {
    fn as_str(self) -> &'static str {
        match self {
            UploadState::Ok => "ok",
            UploadState::OverQuota => "over_quota",
            UploadState::Unavailable => "unavailable",
            UploadState::Failing => "failing",
        }
    }

    fn parse(s: &str) -> Option<UploadState> {
        Some(match s {
            "ok" => UploadState::Ok,
            "over_quota" => UploadState::OverQuota,
            "unavailable" => UploadState::Unavailable,
            "failing" => UploadState::Failing,
            _ => return None,
        })
    }
}

/// The health a mounted drive last published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// The state.
    pub state: UploadState,
    /// Since when (Unix seconds).
    pub since: i64,
    /// When the file was last written (Unix seconds): older than a few heartbeats means
    /// the drive is not mounted.
    pub updated: i64,
    /// The last error's text, for the user.
    pub detail: String,
}

impl Health {
    /// Whether a mounted drive wrote this recently (three heartbeats).
    pub fn is_fresh(&self, now: i64) -> bool {
        now - self.updated <= 3 * HEARTBEAT.as_secs() as i64
    }
}

/// Unix seconds now.
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Read the health published in `state_dir`; `None` if there is none or it is malformed.
pub fn read(state_dir: &Path) -> Option<Health> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(state_dir.join(FILE))
        .ok()?
        .take(MAX_FILE)
        .read_to_string(&mut text)
        .ok()?;
    let (mut state, mut since, mut updated, mut detail) = (None, None, None, String::new());
    for line in text.lines() {
        let (k, v) = line.split_once('=')?;
        match k {
            "state" => state = UploadState::parse(v),
            "since" => since = v.parse().ok(),
            "updated" => updated = v.parse().ok(),
            "detail" => detail = v.chars().take(MAX_DETAIL).collect(),
            _ => {}
        }
    }
    Some(Health {
        state: state?,
        since: since?,
        updated: updated?,
        detail,
    })
}

/// What `status --wait` makes of the published health while uploads are pending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Keep waiting.
    Wait,
    /// Keep waiting, and tell the user once why uploads are held up.
    HeldUp(String),
    /// No drive is mounted: nothing will upload.
    NotMounted,
    /// Over quota with nothing more to give back.
    OverQuota(String),
    /// The storage has been unreachable for this many seconds.
    Unreachable(i64, String),
}

/// How long a drive just mounted, or just refused over quota, gets before the verdict.
pub const GRACE_SECS: i64 = 15;

/// Decide, at `now`, for a wait that began at `started` and tolerates unreachable storage
/// for `limit_secs`, from the health read (if any).
pub fn verdict(health: Option<&Health>, now: i64, started: i64, limit_secs: i64) -> Verdict {
    let Some(h) = health.filter(|h| h.is_fresh(now)) else {
        return if now - started >= GRACE_SECS {
            Verdict::NotMounted
        } else {
            Verdict::Wait
        };
    };
    match h.state {
        UploadState::Ok => Verdict::Wait,
        UploadState::OverQuota if now - h.since.max(started) >= GRACE_SECS => {
            Verdict::OverQuota(h.detail.clone())
        }
        UploadState::Unavailable if now - h.since >= limit_secs => {
            Verdict::Unreachable(now - h.since, h.detail.clone())
        }
        _ => Verdict::HeldUp(h.detail.clone()),
    }
}

/// The uploader's side: publishes changes at once and a heartbeat otherwise.
pub(crate) struct Publisher {
    path: PathBuf,
    state: UploadState,
    detail: String,
    since: i64,
    written: Option<Instant>,
}

impl Publisher {
    pub(crate) fn new(state_dir: &Path) -> Publisher {
        Publisher {
            path: state_dir.join(FILE),
            state: UploadState::Ok,
            detail: String::new(),
            since: now_secs(),
            written: None,
        }
    }

    /// Record the state now (written at once if it changed).
    pub(crate) fn set(&mut self, state: UploadState, detail: &str) {
        let detail: String = detail
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(MAX_DETAIL)
            .collect();
        if state != self.state {
            self.since = now_secs();
            self.state = state;
            self.detail = detail;
            self.write();
        } else if detail != self.detail {
            self.detail = detail;
            self.write();
        }
    }

    /// Rewrite the file if a heartbeat is due.
    pub(crate) fn tick(&mut self) {
        if self.written.is_none_or(|t| t.elapsed() >= HEARTBEAT) {
            self.write();
        }
    }

    fn write(&mut self) {
        let text = format!(
            "state={}\nsince={}\nupdated={}\ndetail={}\n",
            self.state.as_str(),
            self.since,
            now_secs(),
            self.detail
        );
        let tmp = self.path.with_extension("tmp");
        // Best effort: status loses a hint, the drive loses nothing.
        if std::fs::write(&tmp, text).is_ok() && std::fs::rename(&tmp, &self.path).is_ok() {
            self.written = Some(Instant::now());
        }
    }

    /// A clean stop: no drive is mounted any more.
    pub(crate) fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bounds() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()), None);
        let mut p = Publisher::new(dir.path());
        p.tick();
        assert_eq!(read(dir.path()).unwrap().state, UploadState::Ok);
        p.set(UploadState::OverQuota, "over quota:\n10 more bytes needed");
        let h = read(dir.path()).unwrap();
        assert_eq!(h.state, UploadState::OverQuota);
        assert_eq!(h.detail, "over quota: 10 more bytes needed");
        assert!(h.is_fresh(now_secs()));
        assert!(!h.is_fresh(now_secs() + 60));
        p.remove();
        assert_eq!(read(dir.path()), None);
        // Hostile contents: garbage and oversized files read as nothing, never panic.
        std::fs::write(dir.path().join(FILE), "state=ok\nsince=x\n").unwrap();
        assert_eq!(read(dir.path()), None);
        std::fs::write(dir.path().join(FILE), vec![b'a'; 100_000]).unwrap();
        assert_eq!(read(dir.path()), None);
    }

    #[test]
    fn a_wait_always_ends_when_no_progress_is_possible() {
        let h = |state, since, updated| Health {
            state,
            since,
            updated,
            detail: "why".into(),
        };
        let (t0, limit) = (1_000, 120);
        // Nothing mounted (no file, or a stale one): after the grace period, stop.
        assert_eq!(verdict(None, t0 + 5, t0, limit), Verdict::Wait);
        assert_eq!(verdict(None, t0 + 15, t0, limit), Verdict::NotMounted);
        let stale = h(UploadState::Ok, 0, t0 - 60);
        assert_eq!(
            verdict(Some(&stale), t0 + 15, t0, limit),
            Verdict::NotMounted
        );
        // Uploading: wait as long as it takes.
        let ok = h(UploadState::Ok, 0, t0 + 999);
        assert_eq!(verdict(Some(&ok), t0 + 1000, t0, limit), Verdict::Wait);
        // Over quota: a moment for the drive to give space back, then the reason.
        let full = h(UploadState::OverQuota, t0 + 100, t0 + 110);
        assert!(matches!(
            verdict(Some(&full), t0 + 110, t0, limit),
            Verdict::HeldUp(_)
        ));
        assert_eq!(
            verdict(Some(&full), t0 + 115, t0, limit),
            Verdict::OverQuota("why".into())
        );
        // Unreachable: ridden out up to the limit, then the reason.
        let down = h(UploadState::Unavailable, t0, t0 + 118);
        assert!(matches!(
            verdict(Some(&down), t0 + 119, t0, limit),
            Verdict::HeldUp(_)
        ));
        assert_eq!(
            verdict(Some(&down), t0 + 120, t0, limit),
            Verdict::Unreachable(120, "why".into())
        );
    }
}
