//! `kt-laptop`: ktctl's eBPF programs on the developer's machine (see `kt_common::bpf` for the
//! maps' contract). The cgroup sock_addr programs are in [`sock_addr`], the sk_lookup program
//! in [`sk_lookup`]; the maps they share are here.
//!
//! Attached to a cgroup v2 through bpf_links owned by ktctl:
//! - `kt_connect4`/`kt_connect6` (TCP and connected UDP) and `kt_sendmsg4`/`kt_sendmsg6`
//!   (unconnected UDP) rewrite a cluster address to its loopback alias and DNS to a known
//!   resolver to ktctl's DNS server;
//! - `kt_recvmsg4`/`kt_recvmsg6` and `kt_getpeername4`/`kt_getpeername6` show the application
//!   the original address again.
//!
//! They touch only sockets in ktctl's own network namespace (a cgroup holds processes of every
//! namespace: containers on the developer's machine keep their own routes and resolvers) and
//! never a socket that ktctl marked as its own ([`KT_SELF_MARK`]).
//!
//! With `connect -- CMD` the hooks sit on CMD's cgroup and the `kt_guard_*` programs on its
//! parent: they refuse (EPERM) a connect()/sendmsg() to an alias from any task outside CMD's
//! cgroup, since sk_lookup would hand it to the proxy whatever cgroup it came from. A parent's
//! programs run after the child's, so for CMD's own tasks the guard sees the alias its hooks
//! have just written, and lets it pass.
//!
//! Network-namespace wide: `kt_sk_lookup` steers every alias into the proxy's TCP listener or
//! UDP socket. The `*6` programs handle IPv4-mapped IPv6 addresses (an AF_INET6 socket
//! connecting to ::ffff:10.96.0.1 does not pass through connect4).
//!
//! Minimum kernels: connect4/6 4.17; sendmsg4/6 4.18; recvmsg4/6 5.2; `bpf_sock_addr.sk` (for
//! the socket's mark) 5.3; `bpf_get_netns_cookie` and `bpf_get_current_ancestor_cgroup_id` in
//! sock_addr programs 5.7; getpeername4/6 5.8; sk_lookup 5.9. The loader reads the namespace's
//! cookie with `SO_NETNS_COOKIE` (5.14), so ktctl needs Linux >= 5.14.
#![no_std]
#![no_main]

mod sk_lookup;
mod sock_addr;
#[path = "../sock_ctx.rs"]
mod sock_ctx;

use aya_ebpf::macros::map;
use aya_ebpf::maps::{Array, HashMap, LpmTrie, PerCpuArray, SockMap};
use kt_common::bpf::{AliasTarget, CidrTarget, Config, DNS_SLOTS, MAX_CIDRS, counter};

#[map]
pub(crate) static KT_CONFIG: Array<Config> = Array::with_max_entries(1, 0);
/// Cluster CIDRs (and exclusions), keyed by network-order prefix.
#[map]
pub(crate) static CLUSTER_V4: LpmTrie<u32, CidrTarget> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
/// Alias blocks back to their CIDRs.
#[map]
pub(crate) static ALIAS_V4: LpmTrie<u32, AliasTarget> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
/// Resolver address (network order) -> slot.
#[map]
pub(crate) static RESOLVERS: HashMap<u32, u32> = HashMap::with_max_entries(DNS_SLOTS, 0);
/// Slot -> resolver address (network order); 0 = free.
#[map]
pub(crate) static RESOLVER_SLOTS: Array<u32> = Array::with_max_entries(DNS_SLOTS, 0);
/// The proxy's sockets (`kt_common::bpf::sock`).
#[map]
pub(crate) static PROXY_SOCKS: SockMap = SockMap::with_max_entries(2, 0);
#[map]
pub(crate) static KT_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[inline(always)]
pub(crate) fn bump(idx: u32) {
    if let Some(p) = KT_COUNTERS.get_ptr_mut(idx) {
        // SAFETY: a per-CPU slot; no other writer runs on this CPU meanwhile.
        unsafe { *p += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
