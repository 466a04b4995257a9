//! kt-connect's pid files: `~/.kt/pid/<command>-<pid>.pid`, holding the pid. A running ktctl
//! writes its own and removes it when it ends; removing it from outside ends that ktctl
//! gracefully, exactly as Ctrl-C would (kt-connect's scripts and tests stop ktctl this way).

use std::io;
use std::path::{Path, PathBuf};

/// `~/.kt/pid` (`$KT_HOME/pid` when set, as for tests). Under sudo, the invoking user's home, as
/// kt-connect does, so that the user's own scripts find the files.
pub fn dir() -> PathBuf {
    if let Some(h) = std::env::var_os("KT_HOME") {
        return PathBuf::from(h).join("pid");
    }
    home().join(".kt").join("pid")
}

fn home() -> PathBuf {
    if let Ok(user) = std::env::var("SUDO_USER")
        && let Some(h) = passwd_home(&user)
    {
        return h;
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// The home directory of `user` in /etc/passwd.
fn passwd_home(user: &str) -> Option<PathBuf> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 6 && f[0] == user).then(|| PathBuf::from(f[5]))
    })
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
        Ok(PidFile { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
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
