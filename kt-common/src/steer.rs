//! The contract between the router's tc programs (kt-ebpf's `kt-tc` object) and `kt-router
//! node`, which loads them on every pod interface of its node.
//!
//! Steering is destination NAT at the caller's side: on **ingress of a client pod's host-side
//! veth** (before the node routes the packet) a packet to a steered `address:port` (a target
//! pod's IP or the Service's ClusterIP) gets the developer's shadow as its destination, and on
//! **egress of the same veth** the shadow's replies get the original address back as their
//! source, so the caller sees the address it called. Both directions of a steered flow are
//! remembered in bounded LRU maps ([`MAX_FLOWS`] entries per direction), so that:
//!
//! - a flow keeps its shadow while it lives, even after its steering entry is removed (new
//!   connections reach the original pods at once);
//! - only a flow's first packet (a TCP SYN, any UDP datagram) consults the steering map, so a
//!   connection opened before steering began stays with the original pod;
//! - an entry is forgotten once its flow has been idle for its protocol's timeout
//!   ([`Timeouts`]); a TCP flow that saw a FIN or RST gets the short `closing` one.
//!
//! `KT_TC_ACTIVE` (one `u32`) says whether the tc programs have anything to do: the router
//! sets it before it steers anything, and clears it only when nothing is steered and its sweep
//! of the flow maps found no live flow left (expired entries removed). While it is 0 a packet
//! costs one array read, so that a node nobody steers through pays almost nothing for the
//! router.
//!
//! Callers in the node's own network namespace (hostNetwork pods, the node's processes) cross
//! no pod veth before the node routes their packets, so the same object carries cgroup
//! sock_addr programs for them, attached to the node's root cgroup: `connect()` and
//! `sendmsg()` to a steered `address:port` go to the shadow instead, and `getpeername()` and
//! `recvmsg()` show the original again, from a per-socket record ([`SockKey`]) in a bounded LRU
//! map. They act only on sockets in the namespace whose cookie is in `KT_HOST_NETNS` (pods'
//! sockets are the tc programs' business), never on a socket marked [`BYPASS_MARK`], and never
//! for a task of a cgroup in `KT_HOST_EXEMPT` (the kubelet: its probes and port-forwards must
//! reach the pods they name).
//!
//! While the programs act, most packets on a node belong to no steered flow, and finding that
//! out in a flow map costs a hash lookup per packet. `KT_TC_ADDRS` ([`AddrFilter`]) spares
//! them: a bitmap of the `address:port`s that steering can involve (steered destinations,
//! their shadows, and the peers of flows still alive after their steering ended), one bit
//! per [`filter_bit`]. A packet leaving a pod is looked up only if its destination's bit is
//! set, one entering a pod only if its source's is. Bits may be set for nothing (a shared bit
//! costs a lookup that finds nothing); a missing bit would break a flow, so the router sets a
//! destination's and its shadow's bits before it steers them, and clears bits only in its
//! sweep, which recomputes them from what is steered and what flows live.
//!
//! Addresses and ports in keys and values are in network byte order, as they are on the wire;
//! timestamps are `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).

/// Capacity of the steering map (steered `address:port`s on a node).
pub const MAX_STEERS: u32 = 4096;
/// Capacity of each flow map (one entry per steered flow and direction): 2 × 64 Ki entries of
/// 32 bytes plus the kernel's overhead, about 12 MiB per node.
pub const MAX_FLOWS: u32 = 65536;

/// The socket mark (`SO_MARK`) of the router's own connections to original pods, which
/// steering lets through.
pub const BYPASS_MARK: u32 = 0x6b74_0100;

/// IP protocol numbers.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol numbers.
pub const IPPROTO_UDP: u8 = 17;

/// A steered destination: what callers dial.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SteerKey {
    /// Network order.
    pub addr: u32,
    /// Network order.
    pub port: u16,
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub proto: u8,
    /// Zero.
    pub pad: u8,
}

/// Where a steered destination goes: the shadow's pod IP and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteerTarget {
    /// Network order.
    pub addr: u32,
    /// Network order.
    pub port: u16,
    /// Zero.
    pub pad: u16,
}

/// One direction of a steered flow, seen from the client pod: `peer` is the original
/// destination in the forward map and the shadow in the reverse map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The client's address, network order.
    pub client: u32,
    /// The other end's address, network order.
    pub peer: u32,
    /// Network order.
    pub client_port: u16,
    /// Network order.
    pub peer_port: u16,
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub proto: u8,
    /// Zero.
    pub pad: [u8; 3],
}

/// A node socket steered by the sock_addr programs, and the shadow it was sent to: the key of
/// the original destination that `getpeername()`/`recvmsg()` show instead (a [`SteerTarget`]
/// value in `KT_SOCK_ORIG`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// `bpf_get_socket_cookie()`.
    pub cookie: u64,
    /// The shadow's address, network order.
    pub addr: u32,
    /// Network order.
    pub port: u16,
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub proto: u8,
    /// Zero.
    pub pad: u8,
}

/// The translation of a flow's packets and its last activity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// The address that replaces `peer` (forward: the shadow; reverse: the original), network
    /// order.
    pub addr: u32,
    /// Network order.
    pub port: u16,
    /// [`flow_state`] bits.
    pub state: u16,
    /// `bpf_ktime_get_ns()` of the flow's last packet.
    pub seen_ns: u64,
}

/// The `address:port`s that steering can involve (`KT_TC_ADDRS`, slot 0): bit
/// [`filter_bit`]`(addr, port)` of `words`, bit `i` being bit `i % 64` of `words[i / 64]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrFilter {
    /// The bits, 64 a word.
    pub words: [u64; FILTER_BITS as usize / 64],
}

impl Default for AddrFilter {
    fn default() -> AddrFilter {
        AddrFilter {
            words: [0; FILTER_BITS as usize / 64],
        }
    }
}

/// Bits of an [`AddrFilter`]: with a few dozen `address:port`s set, a packet of an unrelated
/// flow hits a set bit about one time in a hundred.
pub const FILTER_BITS: u32 = 1 << FILTER_SHIFT;
const FILTER_SHIFT: u32 = 12;

/// The bit of `addr:port` (both in network order) in an [`AddrFilter`]: a multiplicative
/// (Fibonacci) hash of both, below [`FILTER_BITS`].
#[inline(always)]
pub fn filter_bit(addr: u32, port: u16) -> u32 {
    let port = u32::from(port);
    (addr ^ (port << 16 | port)).wrapping_mul(0x9e37_79b1) >> (32 - FILTER_SHIFT)
}

impl AddrFilter {
    /// Sets the bit of `addr:port`.
    pub fn set(&mut self, addr: u32, port: u16) {
        let i = filter_bit(addr, port);
        self.words[(i / 64) as usize] |= 1 << (i % 64);
    }

    /// Whether the bit of `addr:port` is set.
    #[inline(always)]
    pub fn has(&self, addr: u32, port: u16) -> bool {
        let i = filter_bit(addr, port);
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

/// `Flow.state` bits.
pub mod flow_state {
    /// A FIN or RST went by: the flow is closing and gets the short idle timeout.
    pub const CLOSING: u16 = 1;
}

/// Idle timeouts, in nanoseconds (0: the default). Slot 0 of the `KT_TC_TIMEOUTS` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// An open TCP flow.
    pub tcp_ns: u64,
    /// A UDP flow.
    pub udp_ns: u64,
    /// A TCP flow after a FIN or RST.
    pub closing_ns: u64,
}

/// Default idle timeout of a TCP flow (as long as Linux keeps an idle established flow in its
/// conntrack table is far longer; an hour bounds what a vanished client leaves behind).
pub const TCP_IDLE_NS: u64 = 3600 * 1_000_000_000;
/// Default idle timeout of a UDP flow (nf_conntrack's for a UDP stream).
pub const UDP_IDLE_NS: u64 = 120 * 1_000_000_000;
/// Default idle timeout of a TCP flow after a FIN or RST: long enough for the last ACKs and
/// retransmissions of the close.
pub const CLOSING_IDLE_NS: u64 = 10 * 1_000_000_000;

impl Timeouts {
    /// The idle timeout of a flow of `proto` in `state`, defaults filled in.
    #[inline(always)]
    pub fn idle_ns(&self, proto: u8, state: u16) -> u64 {
        let (set, default) = if state & flow_state::CLOSING != 0 {
            (self.closing_ns, CLOSING_IDLE_NS)
        } else if proto == IPPROTO_UDP {
            (self.udp_ns, UDP_IDLE_NS)
        } else {
            (self.tcp_ns, TCP_IDLE_NS)
        };
        if set == 0 { default } else { set }
    }
}

/// Per-CPU counters of the tc programs (`KT_TC_COUNTERS` indexes).
pub mod counter {
    /// First packets steered to a shadow.
    pub const STEERED: u32 = 0;
    /// Packets of known flows rewritten (both directions).
    pub const REWRITTEN: u32 = 1;
    /// Flow entries found expired and dropped.
    pub const EXPIRED: u32 = 2;
    /// Packets passed untouched because they are IP fragments.
    pub const FRAGMENT: u32 = 3;
    /// Rewrites that failed (a helper error); the packet went on untouched.
    pub const ERROR: u32 = 4;
    /// `connect()`/`sendmsg()` calls of the node's own sockets steered to a shadow.
    pub const HOST_STEERED: u32 = 5;
    /// `getpeername()`/`recvmsg()` calls shown the original address.
    pub const HOST_RESTORED: u32 = 6;
    /// Number of counters.
    pub const COUNT: u32 = 7;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` integers with explicit padding fields.
    unsafe impl aya::Pod for super::SteerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SteerTarget {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Flow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Timeouts {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockKey {}
    // SAFETY: as above (an array of integers).
    unsafe impl aya::Pod for super::AddrFilter {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<SteerKey>(), 8);
        assert_eq!(core::mem::size_of::<SteerTarget>(), 8);
        assert_eq!(core::mem::size_of::<FlowKey>(), 16);
        assert_eq!(core::mem::size_of::<Flow>(), 16);
        assert_eq!(core::mem::size_of::<Timeouts>(), 24);
        assert_eq!(core::mem::size_of::<SockKey>(), 16);
        assert_eq!(core::mem::size_of::<AddrFilter>(), FILTER_BITS as usize / 8);
    }

    #[test]
    fn the_filter_holds_the_bits_set_and_spreads_neighbouring_addresses() {
        let addr = |last: u8| u32::from_be_bytes([10, 96, 0, last]).to_be();
        let port = 80u16.to_be();
        let mut f = AddrFilter::default();
        f.set(addr(10), port);
        assert!(f.has(addr(10), port));
        assert!(
            !f.has(addr(11), port),
            "the next address has a bit of its own"
        );
        assert!(!f.has(addr(10), 81u16.to_be()), "and so has the next port");
        // A Service range's worth of addresses on one port fills most of the bits, not a
        // handful (a hash that ignored the address's low bits would).
        let mut g = AddrFilter::default();
        for i in 0..=255u8 {
            for j in 0..16u8 {
                g.set(u32::from_be_bytes([10, 96, j, i]).to_be(), port);
            }
        }
        let set: u32 = g.words.iter().map(|w| w.count_ones()).sum();
        assert!(
            set > FILTER_BITS / 2,
            "{set} of {FILTER_BITS} bits for 4096 addresses"
        );
    }

    #[test]
    fn timeouts_fall_back_to_the_defaults() {
        let t = Timeouts {
            udp_ns: 5,
            ..Timeouts::default()
        };
        assert_eq!(t.idle_ns(IPPROTO_UDP, 0), 5);
        assert_eq!(t.idle_ns(IPPROTO_TCP, 0), TCP_IDLE_NS);
        assert_eq!(t.idle_ns(IPPROTO_TCP, flow_state::CLOSING), CLOSING_IDLE_NS);
    }
}
