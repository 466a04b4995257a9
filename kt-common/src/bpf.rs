//! The contract between the eBPF programs (kt-ebpf) and the loader (kt-userspace).
//!
//! Addresses in the cluster's CIDRs are rewritten at `connect()`/`sendmsg()` time into an alias
//! in 127.128.0.0/9 (so the packet stays on loopback), keeping the port; an `sk_lookup` program
//! hands every alias to the proxy's sockets, and the proxy reads the alias back with
//! getsockname()/IP_ORIGDSTADDR. Each cluster CIDR gets an aligned block of the alias space, so
//! both directions are one LPM lookup plus an offset and no per-connection state exists.
//!
//! DNS to a known resolver (port 53) is rewritten to 127.127.53.<slot>, where ktctl's DNS
//! server listens; `recvmsg`/`getpeername` turn both kinds of alias back into the original
//! address, so applications never see an alias.
//!
//! All addresses in map keys are in network byte order (as the kernel's `user_ip4` is); all
//! values are in host byte order unless a field says otherwise.

/// First address of the alias space (127.128.0.0), host byte order.
pub const ALIAS_NET: u32 = 0x7f80_0000;
/// Prefix length of the alias space (a /9: 2^23 addresses).
pub const ALIAS_PREFIX: u32 = 9;
/// Number of addresses in the alias space.
pub const ALIAS_SIZE: u64 = 1 << (32 - ALIAS_PREFIX);
/// Mask of the alias space, host byte order.
pub const ALIAS_MASK: u32 = !((1u32 << (32 - ALIAS_PREFIX)) - 1);

/// First address of the resolver aliases (127.127.53.0), host byte order; slot `n` is `.n`.
pub const DNS_ALIAS_NET: u32 = 0x7f7f_3500;
/// Number of resolver slots (slot 0 is unused so that `.0` is never an alias).
pub const DNS_SLOTS: u32 = 16;
/// The DNS port.
pub const DNS_PORT: u16 = 53;

/// Capacity of the CIDR tries.
pub const MAX_CIDRS: u32 = 256;

/// `Config.flags`: rewrite cluster addresses.
pub const FLAG_REDIRECT: u32 = 1;
/// `Config.flags`: rewrite DNS to known resolvers.
pub const FLAG_DNS: u32 = 1 << 1;

/// `SO_MARK` of ktctl's own sockets (its upstream DNS queries): the hooks never rewrite a socket
/// carrying it. A mark, not the process id, because the kernel's tgid differs from `getpid()`
/// inside a PID namespace (Cilium marks its proxy's sockets for the same reason). "kt" in the
/// high half, low 16 bits clear: it matches none of the marks kube-proxy (0x4000, 0x8000),
/// Cilium (mask 0x0f00) or Tailscale (0x40000/0x80000 under mask 0xff0000) look for.
pub const KT_SELF_MARK: u32 = 0x6b74_0000;

/// The single entry of the `KT_CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Cookie of ktctl's network namespace (`SO_NETNS_COOKIE`): sockets in any other namespace
    /// (containers on the developer's machine) are never rewritten nor restored.
    pub netns_cookie: u64,
    /// cgroup id (the inode of its directory) of `connect -- CMD`'s cgroup: the guard lets only
    /// tasks in it or below it reach an alias. 0 when no guard is attached.
    pub cmd_cgroup: u64,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Explicit padding to a multiple of 8 bytes (so that the struct has no hidden padding);
    /// always 0.
    pub reserved: u32,
}

/// What a matching cluster CIDR does.
pub mod action {
    /// Rewrite to the alias.
    pub const REDIRECT: u32 = 1;
    /// Leave alone (a more specific `--excludeIps` entry, or the API server).
    pub const EXCLUDE: u32 = 2;
}

/// Value of the `CLUSTER_V4` LPM trie (keyed by network-order IPv4 prefix).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CidrTarget {
    /// First address of the CIDR, host order.
    pub net: u32,
    /// First address of its alias block, host order.
    pub alias: u32,
    /// [`action`] value.
    pub action: u32,
}

/// Value of the `ALIAS_V4` LPM trie (keyed by network-order alias prefix): the way back.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AliasTarget {
    /// First address of the alias block, host order.
    pub alias: u32,
    /// First address of the CIDR it stands for, host order.
    pub net: u32,
}

/// Indexes into the `PROXY_SOCKS` sock map.
pub mod sock {
    /// The proxy's TCP listener.
    pub const TCP: u32 = 0;
    /// The proxy's UDP socket (IP_RECVORIGDSTADDR set).
    pub const UDP: u32 = 1;
}

/// Indexes into the `KT_COUNTERS` per-CPU array (for `ktctl diagnose`).
pub mod counter {
    /// connect() rewritten to a cluster alias.
    pub const CONNECT: u32 = 0;
    /// sendmsg() rewritten to a cluster alias.
    pub const SENDMSG: u32 = 1;
    /// connect()/sendmsg() rewritten to a resolver alias.
    pub const DNS: u32 = 2;
    /// ktctl's own socket (marked [`KT_SELF_MARK`](super::KT_SELF_MARK)) left alone.
    pub const SELF: u32 = 3;
    /// recvmsg()/getpeername() turned an alias back.
    pub const RESTORE: u32 = 4;
    /// sk_lookup steered a packet into the proxy.
    pub const LOOKUP: u32 = 5;
    /// sk_lookup found no proxy socket.
    pub const LOOKUP_MISS: u32 = 6;
    /// The guard refused a direct connect()/sendmsg() to an alias from outside CMD's cgroup.
    pub const DENIED: u32 = 7;
    /// Number of counters.
    pub const COUNT: u32 = 8;
}

/// The alias of `addr` (host order) inside `target`'s block.
#[inline(always)]
pub fn to_alias(target: &CidrTarget, addr: u32) -> u32 {
    target.alias.wrapping_add(addr.wrapping_sub(target.net))
}

/// The original address of `alias` (host order) inside `target`'s block.
#[inline(always)]
pub fn from_alias(target: &AliasTarget, alias: u32) -> u32 {
    target.net.wrapping_add(alias.wrapping_sub(target.alias))
}

/// Whether `addr` (host order) is in the alias space.
#[inline(always)]
pub fn is_alias(addr: u32) -> bool {
    addr & ALIAS_MASK == ALIAS_NET
}

/// The resolver slot of `addr` (host order), if it is a resolver alias.
#[inline(always)]
pub fn dns_slot(addr: u32) -> Option<u32> {
    let slot = addr.wrapping_sub(DNS_ALIAS_NET);
    if addr & 0xffff_ff00 == DNS_ALIAS_NET && slot > 0 && slot < DNS_SLOTS {
        Some(slot)
    } else {
        None
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], two u64 then two u32 fields: no padding.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: #[repr(C)] structs of u32 fields, without padding.
    unsafe impl aya::Pod for super::CidrTarget {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AliasTarget {}
}

/// The cookie of the network namespace `sock` lives in, as the programs'
/// `bpf_get_netns_cookie()` sees it (`SO_NETNS_COOKIE`, Linux >= 5.14).
#[cfg(feature = "user")]
pub fn netns_cookie(sock: std::os::fd::BorrowedFd<'_>) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    let mut cookie = 0u64;
    let mut len = core::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a u64 of the length passed.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_round_trip() {
        let net = 0x0a60_0000; // 10.96.0.0
        let c = CidrTarget {
            net,
            alias: ALIAS_NET + 0x1_0000,
            action: action::REDIRECT,
        };
        let a = AliasTarget {
            alias: c.alias,
            net,
        };
        let addr = 0x0a60_0a05; // 10.96.10.5
        let alias = to_alias(&c, addr);
        assert!(is_alias(alias));
        assert_eq!(alias, 0x7f81_0a05);
        assert_eq!(from_alias(&a, alias), addr);
    }

    #[test]
    fn alias_space_edges() {
        assert!(is_alias(0x7f80_0000));
        assert!(is_alias(0x7fff_ffff));
        assert!(!is_alias(0x7f7f_ffff));
        assert!(!is_alias(0x7f00_0001));
        assert_eq!(ALIAS_SIZE, 1 << 23);
    }

    #[test]
    fn config_has_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<Config>(), 24);
        assert_eq!(core::mem::align_of::<Config>(), 8);
    }

    #[test]
    fn dns_slots() {
        assert_eq!(dns_slot(DNS_ALIAS_NET + 1), Some(1));
        assert_eq!(dns_slot(DNS_ALIAS_NET + 15), Some(15));
        assert_eq!(dns_slot(DNS_ALIAS_NET), None);
        assert_eq!(dns_slot(DNS_ALIAS_NET + 16), None);
        assert_eq!(dns_slot(0x7f00_0035), None);
    }
}
