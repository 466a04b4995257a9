//! kt-connect's pid files: `~/.kt/pid/<command>-<pid>.pid`, holding the pid. A running ktctl
//! writes its own and removes it when it ends; removing it from outside ends that ktctl
//! gracefully, exactly as Ctrl-C would (kt-connect's scripts and tests stop ktctl this way).
//!
//! Beside it, `<command>-<pid>.json` says what the process is doing for `ktctl status`: its
//! context, namespace, session and what it changed in the cluster ([`Record`]), rewritten as
//! that changes.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What a running ktctl is doing, as `ktctl status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub pid: u32,
    pub command: String,
    /// The command line.
    pub args: Vec<String>,
    pub context: String,
    pub namespace: String,
    /// When it started (RFC 3339).
    pub since: String,
    /// Its session, once it has one.
    pub session: Option<String>,
    /// What it created and changed in the cluster (`pod/x`, `selector of service/y`).
    pub changed: Vec<String>,
}

/// This process's record, and where it is written once the pid file exists.
static CURRENT: Mutex<(Option<PathBuf>, Option<Record>)> = Mutex::new((None, None));

/// Updates this process's record (kept in memory until the pid file is written, then
/// written beside it). Failures to write are ignored: the record is for people to read.
pub fn update(f: impl FnOnce(&mut Record)) {
    let mut cur = CURRENT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (path, record) = &mut *cur;
    let r = record.get_or_insert_with(|| Record {
        pid: std::process::id(),
        args: std::env::args().collect(),
        since: k8s_openapi::jiff::Timestamp::now()
            .round(k8s_openapi::jiff::Unit::Second)
            .map(|t| t.to_string())
            .unwrap_or_default(),
        ..Default::default()
    });
    f(r);
    if let Some(p) = path {
        write_record(p, r);
    }
}

fn write_record(path: &Path, r: &Record) {
    if let Ok(json) = serde_json::to_vec_pretty(r) {
        let tmp = path.with_extension("json.tmp");
        if std::fs::write(&tmp, json).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }
}

/// The record of a running ktctl, if it wrote one.
pub fn read_record(e: &Entry) -> Option<Record> {
    let raw = std::fs::read(e.path.with_extension("json")).ok()?;
    serde_json::from_slice(&raw).ok()
}

/// `~/.kt/pid`.
pub fn dir() -> PathBuf {
    crate::config::kt_home().join("pid")
}

/// This process's pid file; removed on drop.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
}

impl PidFile {
    /// Writes `<dir>/<command>-<pid>.pid`.
    pub fn create(command: &str) -> io::Result<PidFile> {
        let dir = dir();
        std::fs::create_dir_all(&dir)?;
        let pid = std::process::id();
        let path = dir.join(format!("{command}-{pid}.pid"));
        std::fs::write(&path, pid.to_string())?;
        let json = path.with_extension("json");
        CURRENT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0 = Some(json);
        update(|r| r.command = command.to_string());
        Ok(PidFile { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        CURRENT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0 = None;
        let _ = std::fs::remove_file(self.path.with_extension("json"));
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A pid file found in [`dir`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub path: PathBuf,
    pub command: String,
    pub pid: u32,
}

/// Parses `<command>-<pid>.pid`.
pub fn parse_name(name: &str) -> Option<(String, u32)> {
    let stem = name.strip_suffix(".pid")?;
    let (command, pid) = stem.rsplit_once('-')?;
    Some((command.to_string(), pid.parse().ok()?))
}

/// Every pid file in [`dir`], in name order.
pub fn list() -> io::Result<Vec<Entry>> {
    let mut out = vec![];
    let rd = match std::fs::read_dir(dir()) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in rd {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some((command, pid)) = parse_name(&name) {
            out.push(Entry {
                path: e.path(),
                command,
                pid,
            });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Whether `pid` is a running ktctl (its executable is named `ktctl`, also once replaced on
/// disk by an upgrade): a pid reused by another program does not count.
pub fn is_ktctl(pid: u32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|p| {
            p.file_name()
                .map(|n| matches!(n.to_string_lossy().as_ref(), "ktctl" | "ktctl (deleted)"))
        })
        .unwrap_or(false)
}

/// Removes (or with `dry_run` only lists) the pid files of processes that have ended.
pub fn clean_stale(dry_run: bool) -> crate::error::Result<Vec<PathBuf>> {
    let entries =
        list().map_err(|e| crate::error::Error::io(format!("reading {}", dir().display()), e))?;
    let mut removed = vec![];
    for e in entries {
        if is_ktctl(e.pid) {
            continue;
        }
        if !dry_run {
            let _ = std::fs::remove_file(e.path.with_extension("json"));
            match std::fs::remove_file(&e.path) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => {
                    return Err(crate::error::Error::io(
                        format!("removing {}", e.path.display()),
                        err,
                    ));
                }
            }
        }
        removed.push(e.path);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_file_names_parse_as_kt_connect_writes_them() {
        assert_eq!(parse_name("connect-123.pid"), Some(("connect".into(), 123)));
        assert_eq!(
            parse_name("port-forward-9.pid"),
            Some(("port-forward".into(), 9))
        );
        assert_eq!(parse_name("connect-x.pid"), None);
        assert_eq!(parse_name("connect-1.lock"), None);
    }

    #[test]
    fn this_test_is_not_ktctl_and_pid_one_is_not_either() {
        assert!(!is_ktctl(std::process::id()));
        assert!(!is_ktctl(u32::MAX));
    }
}
