//! `kt-tc`: the router's tc programs (see `kt_common::steer` for the maps' contract and the
//! reasons for where they attach).
//!
//! - `kt_tc_ingress`, on ingress of a pod's host-side veth (the pod's packets, before the node
//!   routes them): a TCP SYN or UDP datagram to a steered `address:port` starts a flow to the
//!   developer's shadow; every packet of a known flow gets the shadow as its destination.
//! - `kt_tc_egress`, on egress of the same veth (packets to the pod): the shadow's replies get
//!   the original `address:port` back as their source.
//!
//! Both leave a packet after one flag read while the node steers nothing, and after one more
//! array read when its destination (out of a pod) or source (into a pod) has no bit in the
//! address filter (`KT_TC_ADDRS`): only the packets that may be steered pay for a flow lookup.
//!
//! IPv4 over Ethernet only (pod veths); IP fragments, other protocols and packets that match
//! no flow leave untouched, and so does a packet whose rewrite fails (counted). The verdict is
//! always `TC_ACT_OK`: the kernel routes the rewritten packet and netfilter's conntrack sees
//! one consistent flow (client to shadow).
//!
//! The `kt_host_*` cgroup sock_addr programs ([`host`]) do the same for callers in the node's
//! own network namespace, at the socket (their packets cross no pod veth).
//!
//! Minimum kernel: tc (cls_bpf) 4.1; the loader attaches with TCX from 6.6 and a clsact qdisc
//! before. The sock_addr programs need 5.8 (getpeername hooks, netns cookies in sock_addr
//! programs from 5.7).
#![no_std]
#![no_main]

mod host;
#[path = "../sock_ctx.rs"]
mod sock_ctx;

use aya_ebpf::bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK};
use aya_ebpf::cty::c_long;
use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::macros::{classifier, map};
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray};
use aya_ebpf::programs::TcContext;
use kt_common::steer::{
    AddrFilter, Flow, FlowKey, IPPROTO_TCP, IPPROTO_UDP, MAX_FLOWS, MAX_STEERS, SockKey, SteerKey,
    SteerTarget, Timeouts, counter, flow_state,
};

/// Steered destinations -> the shadow they go to.
#[map]
pub(crate) static KT_STEER: HashMap<SteerKey, SteerTarget> =
    HashMap::with_max_entries(MAX_STEERS, 0);
/// Forward direction of steered flows (client -> original) -> the shadow.
#[map]
static KT_FLOWS_FWD: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(MAX_FLOWS, 0);
/// Reverse direction (client <- shadow) -> the original.
#[map]
static KT_FLOWS_REV: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(MAX_FLOWS, 0);
#[map]
static KT_TC_TIMEOUTS: Array<Timeouts> = Array::with_max_entries(1, 0);
/// Non-zero while anything is steered on the node or a steered flow may live (set by the
/// router, [`kt_common::steer`]): at 0 the tc programs leave every packet alone after one
/// array read, so a node nobody steers through pays almost nothing.
#[map]
static KT_TC_ACTIVE: Array<u32> = Array::with_max_entries(1, 0);
/// The `address:port`s steering can involve ([`AddrFilter`]): a packet whose destination (out
/// of a pod) or source (into a pod) has no bit here belongs to no steered flow, and is left
/// after one array read instead of a flow-map lookup.
#[map]
static KT_TC_ADDRS: Array<AddrFilter> = Array::with_max_entries(1, 0);
/// The node's network namespace cookie (0: the sock_addr programs do nothing).
#[map]
pub(crate) static KT_HOST_NETNS: Array<u64> = Array::with_max_entries(1, 0);
/// Cgroups (ids) whose tasks' sockets are never steered: the kubelet's.
#[map]
pub(crate) static KT_HOST_EXEMPT: HashMap<u64, u8> = HashMap::with_max_entries(64, 0);
/// Node sockets steered by the sock_addr programs -> the original destination.
#[map]
pub(crate) static KT_SOCK_ORIG: LruHashMap<SockKey, SteerTarget> =
    LruHashMap::with_max_entries(MAX_FLOWS, 0);
#[map]
static KT_TC_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
/// Offsets in the IPv4 header.
const IP_FRAG: usize = ETH_HLEN + 6;
const IP_PROTO: usize = ETH_HLEN + 9;
const IP_CSUM: usize = ETH_HLEN + 10;
const IP_SRC: usize = ETH_HLEN + 12;
const IP_DST: usize = ETH_HLEN + 16;
/// More-fragments flag and fragment offset (host order).
const IP_MF_OFFSET: u16 = 0x3fff;
/// TCP flags byte offset, and its bits.
const TCP_FLAGS: usize = 13;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// Whether the tc programs have anything to do on this node (`KT_TC_ACTIVE`).
#[inline(always)]
fn active() -> bool {
    KT_TC_ACTIVE.get(0).is_some_and(|v| *v != 0)
}

/// Whether `addr:port` may take part in steering (`KT_TC_ADDRS`).
#[inline(always)]
fn involved(addr: u32, port: u16) -> bool {
    KT_TC_ADDRS.get(0).is_some_and(|f| f.has(addr, port))
}

#[inline(always)]
pub(crate) fn bump(idx: u32) {
    if let Some(p) = KT_TC_COUNTERS.get_ptr_mut(idx) {
        // SAFETY: a per-CPU slot; no other writer runs on this CPU meanwhile.
        unsafe { *p += 1 };
    }
}

/// CLOCK_MONOTONIC in nanoseconds.
#[inline(always)]
fn now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// The fields steering looks at; addresses and ports in network order.
struct Packet {
    /// Offset of the TCP/UDP header.
    l4: usize,
    proto: u8,
    src: u32,
    dst: u32,
    sport: u16,
    dport: u16,
    /// TCP flags (0 for UDP).
    flags: u8,
}

impl Packet {
    /// Offset of the L4 checksum.
    #[inline(always)]
    fn csum(&self) -> usize {
        self.l4 + if self.proto == IPPROTO_TCP { 16 } else { 6 }
    }

    /// A TCP SYN without ACK: the only TCP packet that may start a steered flow.
    #[inline(always)]
    fn opens(&self) -> bool {
        self.proto == IPPROTO_UDP || self.flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    #[inline(always)]
    fn closes(&self) -> bool {
        self.flags & (TCP_FIN | TCP_RST) != 0
    }
}

/// The headers steering reads: Ethernet, the longest IPv4 header, TCP up to its flags.
const HEADERS: usize = ETH_HLEN + 60 + TCP_FLAGS + 1;

/// A `T` at `offset` in the packet's linear data, read directly (no helper call), or `None`
/// past its end.
#[inline(always)]
fn at<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    let p = ctx.data() + offset;
    if p + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: inside [data, data_end), as checked just above (and by the verifier).
    Some(unsafe { core::ptr::read_unaligned(p as *const T) })
}

/// The packet's IPv4 TCP/UDP fields, or `None` for anything else (fragments counted). Every
/// packet of the node's pods passes here, so the headers are read in place; only a packet
/// whose headers are not all in its linear part (rare on a veth) pays for pulling them in.
#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Packet> {
    let ethertype: u16 = at(ctx, 12)?;
    if ethertype != ETH_P_IP.to_be() {
        return None;
    }
    if ctx.data() + ETH_HLEN + 20 + 4 > ctx.data_end() {
        let len = (ctx.len() as usize).min(HEADERS) as u32;
        ctx.pull_data(len).ok()?;
    }
    let vihl: u8 = at(ctx, ETH_HLEN)?;
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return None;
    }
    let frag: u16 = at(ctx, IP_FRAG)?;
    if u16::from_be(frag) & IP_MF_OFFSET != 0 {
        bump(counter::FRAGMENT);
        return None;
    }
    let proto: u8 = at(ctx, IP_PROTO)?;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let l4 = ETH_HLEN + ihl;
    let flags = if proto == IPPROTO_TCP {
        at::<u8>(ctx, l4 + TCP_FLAGS)?
    } else {
        0
    };
    Some(Packet {
        l4,
        proto,
        src: at(ctx, IP_SRC)?,
        dst: at(ctx, IP_DST)?,
        sport: at(ctx, l4)?,
        dport: at(ctx, l4 + 2)?,
        flags,
    })
}

/// A live flow entry of `map`, and the time now; an expired one is removed (and counted) and
/// is `None`. The clock is read only when there is an entry: most packets have none, and they
/// should cost no more than the lookup.
#[inline(always)]
fn live(map: &LruHashMap<FlowKey, Flow>, key: &FlowKey) -> Option<(*mut Flow, u64)> {
    let f = map.get_ptr_mut(key)?;
    let now = now();
    // SAFETY: a map value pointer, valid for this program run.
    let (state, seen) = unsafe { ((*f).state, (*f).seen_ns) };
    let idle = KT_TC_TIMEOUTS
        .get(0)
        .map_or(Timeouts::default(), |t| *t)
        .idle_ns(key.proto, state);
    if now.saturating_sub(seen) > idle {
        let _ = map.remove(key);
        bump(counter::EXPIRED);
        return None;
    }
    Some((f, now))
}

/// Records a packet of the flow in both its entries: last activity, and closing once a FIN
/// or RST went by. A missing partner (evicted) is put back, so that an active flow keeps both
/// directions.
#[inline(always)]
fn touch(
    f: *mut Flow,
    partner: &LruHashMap<FlowKey, Flow>,
    partner_key: &FlowKey,
    partner_flow: Flow,
    p: &Packet,
    now: u64,
) {
    let closing = if p.closes() { flow_state::CLOSING } else { 0 };
    // SAFETY: a map value pointer, valid for this program run; racing writers only store a
    // timestamp and set a bit.
    unsafe {
        (*f).seen_ns = now;
        (*f).state |= closing;
    }
    match partner.get_ptr_mut(partner_key) {
        // SAFETY: as above.
        Some(q) => unsafe {
            (*q).seen_ns = now;
            (*q).state |= closing;
        },
        None => {
            let _ = partner.insert(
                partner_key,
                Flow {
                    state: partner_flow.state | closing,
                    seen_ns: now,
                    ..partner_flow
                },
                0,
            );
        }
    }
}

/// Rewrites one address and port of the packet (at `addr_at` and `port_at`) with the L3 and
/// L4 checksums, and counts it (or its failure). A UDP checksum of 0 (none) stays 0.
#[inline(always)]
fn rewrite(ctx: &TcContext, p: &Packet, addr: (usize, u32, u32), port: (usize, u16, u16)) {
    bump(match store_rewrite(ctx, p, addr, port) {
        Ok(()) => counter::REWRITTEN,
        Err(_) => counter::ERROR,
    });
}

#[inline(always)]
fn store_rewrite(
    ctx: &TcContext,
    p: &Packet,
    (addr_at, old_addr, new_addr): (usize, u32, u32),
    (port_at, old_port, new_port): (usize, u16, u16),
) -> Result<(), c_long> {
    let mangled = if p.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let csum = p.csum();
    if old_addr != new_addr {
        ctx.l4_csum_replace(
            csum,
            u64::from(old_addr),
            u64::from(new_addr),
            BPF_F_PSEUDO_HDR as u64 | mangled | 4,
        )?;
        ctx.store(addr_at, &new_addr, 0)?;
        ctx.l3_csum_replace(IP_CSUM, u64::from(old_addr), u64::from(new_addr), 4)?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(csum, u64::from(old_port), u64::from(new_port), mangled | 2)?;
        ctx.store(port_at, &new_port, 0)?;
    }
    Ok(())
}

/// Packets leaving a pod: steer new flows, rewrite the destination of steered ones.
#[classifier]
pub fn kt_tc_ingress(ctx: TcContext) -> i32 {
    if active() {
        let _ = ingress(&ctx);
    }
    TC_ACT_OK
}

#[inline(always)]
fn ingress(ctx: &TcContext) -> Option<()> {
    let p = parse(ctx)?;
    if !involved(p.dst, p.dport) {
        return None;
    }
    let key = FlowKey {
        client: p.src,
        peer: p.dst,
        client_port: p.sport,
        peer_port: p.dport,
        proto: p.proto,
        pad: [0; 3],
    };
    let mut known = live(&KT_FLOWS_FWD, &key).map(|(f, now)| {
        // SAFETY: a map value pointer, valid for this program run.
        (f, unsafe { *f }, now)
    });
    if let Some((_, flow, _)) = known
        && p.flags & TCP_SYN != 0
        && flow.state & flow_state::CLOSING != 0
    {
        // A SYN on a closing flow's addresses is a new connection: steered afresh, or not at
        // all (then none of its packets may match the old entry).
        let _ = KT_FLOWS_FWD.remove(key);
        known = None;
    }
    let (f, flow, now) = match known {
        Some(k) => k,
        None => {
            if !p.opens() {
                return None;
            }
            // SAFETY: the value is copied out at once.
            let t = *unsafe {
                KT_STEER.get(SteerKey {
                    addr: p.dst,
                    port: p.dport,
                    proto: p.proto,
                    pad: 0,
                })
            }?;
            let now = now();
            let flow = Flow {
                addr: t.addr,
                port: t.port,
                state: 0,
                seen_ns: now,
            };
            if KT_FLOWS_FWD.insert(key, flow, 0).is_err() {
                bump(counter::ERROR);
                return None;
            }
            bump(counter::STEERED);
            (KT_FLOWS_FWD.get_ptr_mut(key)?, flow, now)
        }
    };
    let rkey = FlowKey {
        peer: flow.addr,
        peer_port: flow.port,
        ..key
    };
    let reverse = Flow {
        addr: p.dst,
        port: p.dport,
        state: 0,
        seen_ns: now,
    };
    touch(f, &KT_FLOWS_REV, &rkey, reverse, &p, now);
    rewrite(
        ctx,
        &p,
        (IP_DST, p.dst, flow.addr),
        (p.l4 + 2, p.dport, flow.port),
    );
    Some(())
}

/// Packets entering a pod: give a shadow's replies the original source back.
#[classifier]
pub fn kt_tc_egress(ctx: TcContext) -> i32 {
    if active() {
        let _ = egress(&ctx);
    }
    TC_ACT_OK
}

#[inline(always)]
fn egress(ctx: &TcContext) -> Option<()> {
    let p = parse(ctx)?;
    if !involved(p.src, p.sport) {
        return None;
    }
    let key = FlowKey {
        client: p.dst,
        peer: p.src,
        client_port: p.dport,
        peer_port: p.sport,
        proto: p.proto,
        pad: [0; 3],
    };
    let (f, now) = live(&KT_FLOWS_REV, &key)?;
    // SAFETY: a map value pointer, valid for this program run.
    let flow = unsafe { *f };
    let fkey = FlowKey {
        peer: flow.addr,
        peer_port: flow.port,
        ..key
    };
    let forward = Flow {
        addr: p.src,
        port: p.sport,
        state: 0,
        seen_ns: now,
    };
    touch(f, &KT_FLOWS_FWD, &fkey, forward, &p, now);
    rewrite(
        ctx,
        &p,
        (IP_SRC, p.src, flow.addr),
        (p.l4, p.sport, flow.port),
    );
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
