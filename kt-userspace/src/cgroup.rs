//! cgroup v2: finding the mount, choosing where the hooks attach, and the child cgroup of
//! `ktctl connect -- CMD`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::EnvError;

/// The cgroup v2 mount point from /proc/self/mountinfo (hybrid hosts mount it under
/// /sys/fs/cgroup/unified, pure v2 hosts at /sys/fs/cgroup).
pub fn v2_root() -> Result<PathBuf, EnvError> {
    let info = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| EnvError::new(format!("reading /proc/self/mountinfo: {e}")))?;
    v2_root_from(&info).ok_or_else(|| {
        EnvError::new("no cgroup v2 mount found; ktctl needs cgroup v2 (mount -t cgroup2 none /sys/fs/cgroup/unified, or boot with systemd.unified_cgroup_hierarchy=1)")
    })
}

fn v2_root_from(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let f: Vec<&str> = line.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-")?;
        (f.get(sep + 1) == Some(&"cgroup2")).then(|| PathBuf::from(f[4]))
    })
}

/// Where machine-wide hooks attach: `--cgroup`, else `$KT_CGROUP` (the testbed sets it to its
/// simulated machine's cgroup), else the cgroup v2 root.
pub fn target(flag: Option<&Path>) -> Result<PathBuf, EnvError> {
    let p = match flag {
        Some(p) => p.to_path_buf(),
        None => match std::env::var_os("KT_CGROUP") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => v2_root()?,
        },
    };
    check_v2_dir(&p)?;
    Ok(p)
}

fn check_v2_dir(p: &Path) -> Result<(), EnvError> {
    if !p.join("cgroup.procs").exists() || !p.join("cgroup.controllers").exists() {
        return Err(EnvError::new(format!(
            "{} is not a cgroup v2 folder (--cgroup or KT_CGROUP)",
            p.display()
        )));
    }
    Ok(())
}

/// The name of a `connect -- CMD` session's cgroup: `ktctl-<session>-<ktctl's pid>`, so that
/// a later ktctl can tell a live session's cgroup from one a killed ktctl left.
pub fn child_name(session: &str) -> String {
    format!("ktctl-{session}-{}", std::process::id())
}

/// Whether `pid` is a running ktctl.
fn is_live_ktctl(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "ktctl")
}

/// Removes cgroups that a ktctl killed with SIGKILL left under `parent` (its Drop guard never
/// ran). An empty one is removed; one that still holds processes (CMD's children outlived
/// their ktctl) is reported with them and left alone: they are the user's processes.
/// Returns the names removed.
pub fn sweep_leftovers(parent: &Path) -> Vec<String> {
    let Ok(dir) = fs::read_dir(parent) else {
        return vec![];
    };
    let mut removed = vec![];
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("ktctl-") || !e.path().is_dir() {
            continue;
        }
        let owner = name.rsplit('-').next().and_then(|p| p.parse::<i32>().ok());
        if owner.is_some_and(|pid| pid != std::process::id() as i32 && is_live_ktctl(pid)) {
            continue;
        }
        let pids: Vec<i32> = fs::read_to_string(e.path().join("cgroup.procs"))
            .map(|s| {
                s.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        if pids.is_empty() {
            match fs::remove_dir(e.path()) {
                Ok(()) => {
                    tracing::info!("Removed cgroup {name} left by a ktctl that was killed");
                    removed.push(name);
                }
                Err(err) => {
                    tracing::warn!(cgroup = %e.path().display(), error = %err, "cannot remove a leftover cgroup")
                }
            }
        } else {
            let procs: Vec<String> = pids
                .iter()
                .map(|p| {
                    let comm = fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
                    format!("{p} ({})", comm.trim())
                })
                .collect();
            tracing::warn!(
                "cgroup {} was left by a ktctl that was killed and still holds processes: {}; they no longer reach the cluster. End them to let it go (`kill {}`), and the next ktctl removes it",
                e.path().display(),
                procs.join(", "),
                pids.iter()
                    .map(i32::to_string)
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
    }
    removed
}

/// A child cgroup ktctl made; dropping it kills what is left in it (CMD's leftovers, all
/// started by ktctl) and removes it.
#[derive(Debug)]
pub struct ChildCgroup {
    path: PathBuf,
}

impl ChildCgroup {
    /// Makes `<parent>/<name>`.
    pub fn create(parent: &Path, name: &str) -> Result<ChildCgroup, EnvError> {
        check_v2_dir(parent)?;
        let path = parent.join(name);
        fs::create_dir(&path)
            .map_err(|e| EnvError::new(format!("creating cgroup {}: {e}", path.display())))?;
        Ok(ChildCgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Processes still in it.
    pub fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .map(|s| {
                s.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn kill_all(&self) {
        for _ in 0..200 {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            if fs::write(self.path.join("cgroup.kill"), "1").is_err() {
                for pid in pids {
                    // SAFETY: kill(2) on processes in ktctl's own child cgroup (CMD and its children).
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        self.kill_all();
        if let Err(e) = fs::remove_dir(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(cgroup = %self.path.display(), error = %e, "could not remove the cgroup");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    /// Regression: `kill -9` of `ktctl connect -- CMD` left its cgroup behind for good.
    fn leftover_cgroup_folders_of_dead_ktctls_are_removed_and_live_ones_kept() {
        // Plain folders stand in for cgroups: the sweep only reads cgroup.procs and rmdirs.
        let parent = std::env::temp_dir().join(format!("kt-sweep-{}", std::process::id()));
        let _ = fs::remove_dir_all(&parent);
        fs::create_dir(&parent).unwrap();
        // A dead owner (pid 0 is never a process), the old name format, and ours.
        fs::create_dir(parent.join("ktctl-abc123-0")).unwrap();
        fs::create_dir(parent.join("ktctl-def456")).unwrap();
        fs::create_dir(parent.join("unrelated")).unwrap();
        let mut removed = sweep_leftovers(&parent);
        removed.sort();
        assert_eq!(removed, vec!["ktctl-abc123-0", "ktctl-def456"]);
        assert!(parent.join("unrelated").exists());
        // One still holding processes is kept (and reported).
        let busy = parent.join("ktctl-ghi789-0");
        fs::create_dir(&busy).unwrap();
        fs::write(
            busy.join("cgroup.procs"),
            format!("{}\n", std::process::id()),
        )
        .unwrap();
        assert!(sweep_leftovers(&parent).is_empty());
        assert!(busy.exists());
        fs::remove_dir_all(&parent).unwrap();
    }

    #[test]
    fn finds_the_v2_mount_on_hybrid_and_pure_hosts() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            v2_root_from(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure =
            "30 23 0:27 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(v2_root_from(pure), Some(PathBuf::from("/sys/fs/cgroup")));
        let none = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw\n";
        assert_eq!(v2_root_from(none), None);
    }
}
