//! Simulated machines: a network namespace plus a cgroup v2 each, and commands run inside them.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, bail};

use crate::layout::{Layout, Machine};

/// The cgroup v2 mount point, read from /proc/self/mountinfo (hybrid hosts have it under
/// /sys/fs/cgroup/unified, pure v2 hosts at /sys/fs/cgroup).
pub fn cgroup2_root() -> Result<PathBuf> {
    let info =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if let Some(sep) = fields.iter().position(|f| *f == "-")
            && fields.get(sep + 1) == Some(&"cgroup2")
            && let Some(point) = fields.get(4)
        {
            return Ok(PathBuf::from(point));
        }
    }
    bail!("no cgroup v2 mount on this machine (the testbed needs one: mount -t cgroup2 none <dir>)")
}

/// The machine's cgroup: a child of the cgroup v2 root that plays the machine's root cgroup.
pub fn cgroup(m: Machine) -> Result<PathBuf> {
    Ok(cgroup2_root()?.join(m.name()))
}

pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Runs `ip ARGS`, failing with its output.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `ip ARGS`, ignoring "already exists" so that `up` can be repeated.
pub fn ip_idempotent(args: &[&str]) -> Result<()> {
    match ip(args) {
        Err(e) if e.to_string().contains("File exists") => Ok(()),
        other => other,
    }
}

/// Network namespaces whose names start with `prefix`.
pub fn list_netns(prefix: &str) -> Vec<String> {
    let Ok(rd) = fs::read_dir("/run/netns") else {
        return vec![];
    };
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v
}

/// Writes a sysctl of a namespace by entering it (only /proc/sys/net is per namespace).
pub fn sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ])
        .output()
        .context("running sysctl")?;
    if !out.status.success() {
        bail!(
            "sysctl {key}={value} in {netns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// What a command inside a machine gets: its namespace, its cgroup, and for the laptop its
/// own resolv.conf (bind-mounted in a private mount namespace, as `ip netns exec` does, but
/// keeping /sys so that the cgroup v2 mount stays visible).
pub struct Enter {
    netns: File,
    cgroup_procs: File,
    resolv: Option<(CString, CString)>,
    slash: CString,
}

impl Enter {
    pub fn new(m: Machine) -> Result<Enter> {
        let ns = netns_path(&m.name());
        let netns = File::open(&ns).with_context(|| {
            format!(
                "{} does not exist: is the testbed up? (cargo xtask testbed up)",
                ns.display()
            )
        })?;
        let procs = cgroup(m)?.join("cgroup.procs");
        let cgroup_procs = OpenOptions::new()
            .write(true)
            .open(&procs)
            .with_context(|| format!("opening {}", procs.display()))?;
        let resolv_src = Layout::netns_etc(m).join("resolv.conf");
        let resolv = if resolv_src.exists() {
            let target = fs::canonicalize("/etc/resolv.conf")
                .unwrap_or_else(|_| PathBuf::from("/etc/resolv.conf"));
            Some((cstr(&resolv_src)?, cstr(&target)?))
        } else {
            None
        };
        Ok(Enter {
            netns,
            cgroup_procs,
            resolv,
            slash: CString::new("/")?,
        })
    }

    /// Sets up `cmd` to start inside the machine. `detach` also starts a new session.
    pub fn apply(self, cmd: &mut Command, detach: bool) {
        let netns = self.netns.as_raw_fd();
        let procs = self.cgroup_procs.as_raw_fd();
        // SAFETY: the closure runs between fork and exec and only makes system calls on
        // descriptors and strings prepared beforehand (no allocation, no locks).
        unsafe {
            cmd.pre_exec(move || {
                let _keep = (&self.netns, &self.cgroup_procs);
                if libc::setns(netns, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some((src, dst)) = &self.resolv {
                    if libc::unshare(libc::CLONE_NEWNS) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let flags = libc::MS_REC | libc::MS_SLAVE;
                    if libc::mount(
                        std::ptr::null(),
                        self.slash.as_ptr(),
                        std::ptr::null(),
                        flags,
                        std::ptr::null(),
                    ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    if libc::mount(
                        src.as_ptr(),
                        dst.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if detach && libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

fn cstr(p: &Path) -> Result<CString> {
    Ok(CString::new(p.as_os_str().as_encoded_bytes())?)
}

/// The environment every command in a machine gets.
pub fn machine_env(layout: &Layout, m: Machine, cmd: &mut Command) -> Result<()> {
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
    cmd.env(
        "PATH",
        format!("{}:{path}:/usr/sbin:/sbin", layout.bin().display()),
    )
    .env("KUBECONFIG", layout.kubeconfig())
    .env("KT_CGROUP", cgroup(m)?)
    .env("KT_HOME", layout.kt_home(m))
    .env("KT_TESTBED_MACHINE", m.name());
    Ok(())
}

/// A command that runs `program` inside machine `m` (not detached).
pub fn command(
    layout: &Layout,
    m: Machine,
    program: impl AsRef<std::ffi::OsStr>,
) -> Result<Command> {
    // The testbed's own tools (kubectl, kt-node, ktctl...) come first, as on the machine's PATH.
    let program = program.as_ref();
    let own = layout.bin().join(program);
    let mut cmd = if !program.as_encoded_bytes().contains(&b'/') && own.exists() {
        Command::new(own)
    } else {
        Command::new(program)
    };
    machine_env(layout, m, &mut cmd)?;
    Enter::new(m)?.apply(&mut cmd, false);
    Ok(cmd)
}

/// Runs a command in a machine and returns its output; fails only if it cannot start.
pub fn output(layout: &Layout, m: Machine, args: &[&str]) -> Result<Output> {
    let (prog, rest) = args.split_first().context("no command")?;
    let mut cmd = command(layout, m, prog)?;
    cmd.args(rest);
    cmd.output()
        .with_context(|| format!("running {prog} in {m}"))
}
