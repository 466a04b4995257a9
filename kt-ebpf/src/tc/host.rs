//! The cgroup sock_addr programs for callers in the node's own network namespace
//! (hostNetwork pods, the node's processes), whose packets cross no pod veth: `connect()` and
//! `sendmsg()` to a steered `address:port` go to the shadow, and `getpeername()` and
//! `recvmsg()` show the original again (see `kt_common::steer`).

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::bindings::bpf_sock_addr;
use aya_ebpf::helpers::{bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie};
use aya_ebpf::macros::cgroup_sock_addr;
use aya_ebpf::programs::SockAddrContext;
use kt_common::steer::{BYPASS_MARK, IPPROTO_TCP, IPPROTO_UDP, SockKey, SteerKey, counter};

use crate::sock_ctx::{mapped_v4, mark, user_port};
use crate::{KT_HOST_EXEMPT, KT_HOST_NETNS, KT_SOCK_ORIG, KT_STEER, bump};

/// Whether the socket is a steerable one of the node's: in the namespace the router was told,
/// not one of the router's own connections to original pods, and not opened by a task of an
/// exempt cgroup (the kubelet's probes and port-forwards go to the pods they name).
#[inline(always)]
fn node_socket(sa: *mut bpf_sock_addr) -> bool {
    let Some(&cookie) = KT_HOST_NETNS.get(0) else {
        return false;
    };
    // SAFETY: the helpers take the program's context, which `sa` is, or nothing.
    cookie != 0
        && unsafe { bpf_get_netns_cookie(sa.cast()) } == cookie
        && mark(sa) != BYPASS_MARK
        && unsafe { KT_HOST_EXEMPT.get(bpf_get_current_cgroup_id()) }.is_none()
}

/// The socket's protocol, if steerable.
#[inline(always)]
fn proto(sa: *mut bpf_sock_addr) -> Option<u8> {
    // SAFETY: ctx field read.
    let p = unsafe { read_volatile(addr_of!((*sa).protocol)) } as u8;
    (p == IPPROTO_TCP || p == IPPROTO_UDP).then_some(p)
}

#[inline(always)]
fn cookie(sa: *mut bpf_sock_addr) -> u64 {
    // SAFETY: the helper takes the program's context, which `sa` is.
    unsafe { bpf_get_socket_cookie(sa.cast()) }
}

/// The shadow (address and port, network order) a destination of this socket goes to; the
/// original is remembered for the way back.
#[inline(always)]
fn steer(sa: *mut bpf_sock_addr, addr: u32) -> Option<(u32, u16)> {
    let proto = proto(sa)?;
    let port = user_port(sa).to_be();
    let key = SteerKey {
        addr,
        port,
        proto,
        pad: 0,
    };
    // SAFETY: the value is copied out at once.
    let to = *unsafe { KT_STEER.get(key) }?;
    if !node_socket(sa) {
        return None;
    }
    let back = SockKey {
        cookie: cookie(sa),
        addr: to.addr,
        port: to.port,
        proto,
        pad: 0,
    };
    let orig = kt_common::steer::SteerTarget { addr, port, pad: 0 };
    // A full map evicts the least recently used record: at worst an old socket's
    // getpeername() shows the shadow.
    let _ = KT_SOCK_ORIG.insert(back, orig, 0);
    // SAFETY: user_port is writable in connect and sendmsg programs.
    unsafe { write_volatile(addr_of_mut!((*sa).user_port), u32::from(to.port)) };
    bump(counter::HOST_STEERED);
    Some((to.addr, to.port))
}

/// The original destination (address and port, network order) a shadow's address stands
/// for on this socket.
#[inline(always)]
fn restore(sa: *mut bpf_sock_addr, addr: u32) -> Option<u32> {
    let key = SockKey {
        cookie: cookie(sa),
        addr,
        port: user_port(sa).to_be(),
        proto: proto(sa)?,
        pad: 0,
    };
    // SAFETY: the value is copied out at once.
    let orig = *unsafe { KT_SOCK_ORIG.get(key) }?;
    // SAFETY: user_port is writable in recvmsg and getpeername programs.
    unsafe { write_volatile(addr_of_mut!((*sa).user_port), u32::from(orig.port)) };
    bump(counter::HOST_RESTORED);
    Some(orig.addr)
}

#[inline(always)]
fn out4(sa: *mut bpf_sock_addr) {
    // SAFETY: ctx field read.
    let ip = unsafe { read_volatile(addr_of!((*sa).user_ip4)) };
    if let Some((to, _)) = steer(sa, ip) {
        // SAFETY: user_ip4 is writable in connect4/sendmsg4.
        unsafe { write_volatile(addr_of_mut!((*sa).user_ip4), to) };
    }
}

#[inline(always)]
fn in4(sa: *mut bpf_sock_addr) {
    // SAFETY: ctx field read.
    let ip = unsafe { read_volatile(addr_of!((*sa).user_ip4)) };
    if let Some(orig) = restore(sa, ip) {
        // SAFETY: user_ip4 is writable in recvmsg4/getpeername4.
        unsafe { write_volatile(addr_of_mut!((*sa).user_ip4), orig) };
    }
}

#[inline(always)]
fn out6(sa: *mut bpf_sock_addr) {
    if let Some(ip) = mapped_v4(sa)
        && let Some((to, _)) = steer(sa, ip)
    {
        // SAFETY: user_ip6 is writable in connect6/sendmsg6 (4-byte store).
        unsafe { write_volatile(addr_of_mut!((*sa).user_ip6[3]), to) };
    }
}

#[inline(always)]
fn in6(sa: *mut bpf_sock_addr) {
    if let Some(ip) = mapped_v4(sa)
        && let Some(orig) = restore(sa, ip)
    {
        // SAFETY: user_ip6 is writable in recvmsg6/getpeername6 (4-byte store).
        unsafe { write_volatile(addr_of_mut!((*sa).user_ip6[3]), orig) };
    }
}

#[cgroup_sock_addr(connect4)]
pub fn kt_host_connect4(ctx: SockAddrContext) -> i32 {
    out4(ctx.sock_addr);
    1
}

#[cgroup_sock_addr(sendmsg4)]
pub fn kt_host_sendmsg4(ctx: SockAddrContext) -> i32 {
    out4(ctx.sock_addr);
    1
}

#[cgroup_sock_addr(recvmsg4)]
pub fn kt_host_recvmsg4(ctx: SockAddrContext) -> i32 {
    in4(ctx.sock_addr);
    1
}

#[cgroup_sock_addr(getpeername4)]
pub fn kt_host_getpeername4(ctx: SockAddrContext) -> i32 {
    in4(ctx.sock_addr);
    1
}

#[cgroup_sock_addr(connect6)]
pub fn kt_host_connect6(ctx: SockAddrContext) -> i32 {
    out6(ctx.sock_addr);
    1
}

#[cgroup_sock_addr(sendmsg6)]
pub fn kt_host_sendmsg6(ctx: SockAddrContext) -> i32 {
    out6(ctx.sock_addr);
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn kt_host_recvmsg6(ctx: SockAddrContext) -> i32 {
    in6(ctx.sock_addr);
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn kt_host_getpeername6(ctx: SockAddrContext) -> i32 {
    in6(ctx.sock_addr);
    1
}
