//! The sk_lookup program: hands every alias to the proxy's sockets.

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::bindings::sk_action;
use aya_ebpf::macros::sk_lookup;
use aya_ebpf::programs::SkLookupContext;
use kt_common::bpf::{counter, is_alias, sock};

use crate::{PROXY_SOCKS, bump};

const AF_INET: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

/// Steers packets for an alias into the proxy's sockets; everything else takes the normal
/// socket lookup.
#[sk_lookup]
pub fn kt_sk_lookup(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: ctx field reads.
    let (family, proto, local) = unsafe {
        (
            read_volatile(addr_of!((*l).family)),
            read_volatile(addr_of!((*l).protocol)),
            read_volatile(addr_of!((*l).local_ip4)),
        )
    };
    if family != AF_INET || !is_alias(u32::from_be(local)) {
        return sk_action::SK_PASS;
    }
    let idx = match proto {
        IPPROTO_TCP => sock::TCP,
        IPPROTO_UDP => sock::UDP,
        _ => return sk_action::SK_PASS,
    };
    match PROXY_SOCKS.redirect_sk_lookup(&ctx, idx, 0) {
        Ok(()) => bump(counter::LOOKUP),
        Err(_) => bump(counter::LOOKUP_MISS),
    }
    sk_action::SK_PASS
}
