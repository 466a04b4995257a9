//! The cgroup sock_addr programs: rewrite cluster destinations to their aliases on the way
//! out, and show the application the original address on the way in.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::bindings::bpf_sock_addr;
use aya_ebpf::helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_netns_cookie};
use aya_ebpf::macros::cgroup_sock_addr;
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::programs::SockAddrContext;
use aya_log_ebpf::debug;
use kt_common::bpf::{
    Config, DNS_ALIAS_NET, DNS_PORT, FLAG_DNS, FLAG_REDIRECT, KT_SELF_MARK, action, counter,
    dns_slot, from_alias, is_alias, to_alias,
};

use crate::sock_ctx::{mapped_v4, mark, user_port};
use crate::{ALIAS_V4, CLUSTER_V4, KT_CONFIG, RESOLVER_SLOTS, RESOLVERS, bump};

/// Deepest cgroup level the guard looks at (cgroup v2 nests far less in practice).
const MAX_CGROUP_LEVEL: i32 = 32;

/// Whether the socket behind `sa` lives in ktctl's network namespace.
#[inline(always)]
fn own_netns(sa: *mut bpf_sock_addr, cfg: &Config) -> bool {
    // SAFETY: the helper takes the program's context, which `sa` is.
    unsafe { bpf_get_netns_cookie(sa.cast()) == cfg.netns_cookie }
}

/// Whether the socket behind `sa` is one of ktctl's own (marked [`KT_SELF_MARK`]).
#[inline(always)]
fn own_socket(sa: *mut bpf_sock_addr) -> bool {
    mark(sa) == KT_SELF_MARK
}

/// The rewritten destination (network order) of an outgoing `addr:port`, if any.
#[inline(always)]
fn rewrite_out(sa: *mut bpf_sock_addr, addr_be: u32, port: u16) -> Option<(u32, u32)> {
    let cfg = KT_CONFIG.get(0)?;
    if !own_netns(sa, cfg) {
        return None;
    }
    if own_socket(sa) {
        bump(counter::SELF);
        return None;
    }
    if cfg.flags & FLAG_REDIRECT != 0
        && let Some(t) = CLUSTER_V4.get(Key::new(32, addr_be))
        && t.action == action::REDIRECT
    {
        return Some((to_alias(t, u32::from_be(addr_be)).to_be(), counter::CONNECT));
    }
    if cfg.flags & FLAG_DNS != 0 && port == DNS_PORT {
        // SAFETY: the value is a u32 copied out at once.
        if let Some(slot) = unsafe { RESOLVERS.get(addr_be) } {
            return Some(((DNS_ALIAS_NET + *slot).to_be(), counter::DNS));
        }
    }
    None
}

/// The original address (network order) behind an alias, if `addr_be` is one.
#[inline(always)]
fn restore_in(sa: *mut bpf_sock_addr, addr_be: u32) -> Option<u32> {
    let a = u32::from_be(addr_be);
    if !is_alias(a) && dns_slot(a).is_none() {
        return None;
    }
    if !own_netns(sa, KT_CONFIG.get(0)?) {
        return None;
    }
    if is_alias(a) {
        let t = ALIAS_V4.get(Key::new(32, addr_be))?;
        return Some(from_alias(t, a).to_be());
    }
    let slot = dns_slot(a)?;
    let ip = *RESOLVER_SLOTS.get(slot)?;
    if ip == 0 { None } else { Some(ip) }
}

#[inline(always)]
fn out4(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: ctx field read.
    let ip = unsafe { read_volatile(addr_of!((*sa).user_ip4)) };
    if let Some((new, kind)) = rewrite_out(sa, ip, user_port(sa)) {
        // SAFETY: user_ip4 is writable in connect4/sendmsg4.
        unsafe { write_volatile(addr_of_mut!((*sa).user_ip4), new) };
        bump(kind);
        debug!(
            ctx,
            "redirect {:i}:{} to {:i}",
            u32::from_be(ip),
            user_port(sa),
            u32::from_be(new)
        );
    }
}

#[inline(always)]
fn in4(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: ctx field read.
    let ip = unsafe { read_volatile(addr_of!((*sa).user_ip4)) };
    if let Some(orig) = restore_in(sa, ip) {
        // SAFETY: user_ip4 is writable in recvmsg4/getpeername4.
        unsafe { write_volatile(addr_of_mut!((*sa).user_ip4), orig) };
        bump(counter::RESTORE);
    }
}

#[inline(always)]
fn out6(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    if let Some(ip) = mapped_v4(sa)
        && let Some((new, kind)) = rewrite_out(sa, ip, user_port(sa))
    {
        // SAFETY: user_ip6 is writable in connect6/sendmsg6 (4-byte store).
        unsafe { write_volatile(addr_of_mut!((*sa).user_ip6[3]), new) };
        bump(kind);
    }
}

#[inline(always)]
fn in6(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    if let Some(ip) = mapped_v4(sa)
        && let Some(orig) = restore_in(sa, ip)
    {
        // SAFETY: user_ip6 is writable in recvmsg6/getpeername6.
        unsafe { write_volatile(addr_of_mut!((*sa).user_ip6[3]), orig) };
        bump(counter::RESTORE);
    }
}

#[cgroup_sock_addr(connect4)]
pub fn kt_connect4(ctx: SockAddrContext) -> i32 {
    out4(&ctx);
    1
}

#[cgroup_sock_addr(sendmsg4)]
pub fn kt_sendmsg4(ctx: SockAddrContext) -> i32 {
    out4(&ctx);
    1
}

#[cgroup_sock_addr(recvmsg4)]
pub fn kt_recvmsg4(ctx: SockAddrContext) -> i32 {
    in4(&ctx);
    1
}

#[cgroup_sock_addr(getpeername4)]
pub fn kt_getpeername4(ctx: SockAddrContext) -> i32 {
    in4(&ctx);
    1
}

#[cgroup_sock_addr(connect6)]
pub fn kt_connect6(ctx: SockAddrContext) -> i32 {
    out6(&ctx);
    1
}

#[cgroup_sock_addr(sendmsg6)]
pub fn kt_sendmsg6(ctx: SockAddrContext) -> i32 {
    out6(&ctx);
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn kt_recvmsg6(ctx: SockAddrContext) -> i32 {
    in6(&ctx);
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn kt_getpeername6(ctx: SockAddrContext) -> i32 {
    in6(&ctx);
    1
}

/// Whether the current task is in the cgroup `id` or below it.
#[inline(always)]
fn task_under(id: u64) -> bool {
    let mut level = 0;
    while level < MAX_CGROUP_LEVEL {
        // SAFETY: a helper without pointer arguments; 0 past the task's own level.
        let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if ancestor == 0 {
            return false;
        }
        if ancestor == id {
            return true;
        }
        level += 1;
    }
    false
}

/// The guard's verdict on a destination (network order): 0 refuses (EPERM) an alias from a
/// task outside CMD's cgroup in ktctl's namespace, 1 lets everything else through.
#[inline(always)]
fn guard(sa: *mut bpf_sock_addr, addr_be: u32) -> i32 {
    let a = u32::from_be(addr_be);
    if !is_alias(a) && dns_slot(a).is_none() {
        return 1;
    }
    let Some(cfg) = KT_CONFIG.get(0) else {
        return 1;
    };
    if !own_netns(sa, cfg) || task_under(cfg.cmd_cgroup) {
        return 1;
    }
    bump(counter::DENIED);
    0
}

#[inline(always)]
fn guard4(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: ctx field read.
    guard(sa, unsafe { read_volatile(addr_of!((*sa).user_ip4)) })
}

#[inline(always)]
fn guard6(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    match mapped_v4(sa) {
        Some(ip) => guard(sa, ip),
        None => 1,
    }
}

#[cgroup_sock_addr(connect4)]
pub fn kt_guard_connect4(ctx: SockAddrContext) -> i32 {
    guard4(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn kt_guard_sendmsg4(ctx: SockAddrContext) -> i32 {
    guard4(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn kt_guard_connect6(ctx: SockAddrContext) -> i32 {
    guard6(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn kt_guard_sendmsg6(ctx: SockAddrContext) -> i32 {
    guard6(&ctx)
}
