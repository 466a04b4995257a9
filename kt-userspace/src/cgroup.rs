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
