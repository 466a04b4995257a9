//! What `connect` needs from this machine, checked before anything touches the cluster.

use std::fs;

use crate::error::EnvError;

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Kernel release as (major, minor).
pub fn kernel_version() -> Option<(u32, u32)> {
    let r = fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    parse_release(&r)
}

fn parse_release(r: &str) -> Option<(u32, u32)> {
    let mut it = r.trim().split(['.', '-']);
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// The effective capability set of this process.
fn effective_caps() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("CapEff:")
                    .map(|v| u64::from_str_radix(v.trim(), 16).unwrap_or(0))
            })
        })
        .unwrap_or(0)
}

/// The capabilities of `caps` that `connect` lacks, by name.
fn missing_caps(caps: u64) -> Vec<&'static str> {
    [
        (CAP_BPF, "CAP_BPF"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ]
    .into_iter()
    .filter(|(bit, _)| caps & (1u64 << bit) == 0)
    .map(|(_, name)| name)
    .collect()
}

/// The oldest kernel `connect` runs on: sk_lookup links (5.9), the network namespace's cookie
/// in the hooks (5.7) and through SO_NETNS_COOKIE (5.14).
pub const MIN_KERNEL: (u32, u32) = (5, 14);

/// Kernel >= [`MIN_KERNEL`], the capabilities, and cgroup v2.
pub fn check() -> Result<(), EnvError> {
    match kernel_version() {
        Some(v) if v >= MIN_KERNEL => {}
        Some((a, b)) => {
            return Err(EnvError::new(format!(
                "Linux {a}.{b} is too old: ktctl connect needs Linux {}.{} or newer (cgroup sock_addr hooks, sk_lookup, SO_NETNS_COOKIE)",
                MIN_KERNEL.0, MIN_KERNEL.1
            )));
        }
        None => {
            return Err(EnvError::new(
                "cannot read the kernel version from /proc/sys/kernel/osrelease",
            ));
        }
    }
    let missing = missing_caps(effective_caps());
    if !missing.is_empty() {
        return Err(EnvError::new(format!(
            "ktctl connect needs root, or the capabilities CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN (missing: {}); try sudo",
            missing.join(", ")
        )));
    }
    crate::cgroup::v2_root()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_parse() {
        assert_eq!(parse_release("6.18.44-fc-v669\n"), Some((6, 18)));
        assert_eq!(parse_release("5.9.0"), Some((5, 9)));
        assert_eq!(parse_release("5.10-rc1"), Some((5, 10)));
        assert_eq!(parse_release("garbage"), None);
    }

    #[test]
    fn names_every_missing_capability() {
        assert_eq!(
            missing_caps(0),
            vec!["CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"]
        );
        assert_eq!(missing_caps(u64::MAX), Vec::<&str>::new());
        assert_eq!(
            missing_caps(1 << CAP_BPF | 1 << CAP_SYS_ADMIN),
            vec!["CAP_NET_ADMIN"]
        );
    }
}
