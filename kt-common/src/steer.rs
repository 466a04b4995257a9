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
