//! Reads of a `bpf_sock_addr` context that both objects' cgroup sock_addr programs need
//! (included by each bin with `#[path]`).

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::bindings::bpf_sock_addr;

/// The destination (or source, on the way in) port, host order.
#[inline(always)]
pub(crate) fn user_port(sa: *mut bpf_sock_addr) -> u16 {
    // SAFETY: ctx field, 4-byte read as the verifier requires.
    u16::from_be(unsafe { read_volatile(addr_of!((*sa).user_port)) } as u16)
}

/// The IPv4 address inside an IPv4-mapped IPv6 address (::ffff:a.b.c.d), network order.
#[inline(always)]
pub(crate) fn mapped_v4(sa: *mut bpf_sock_addr) -> Option<u32> {
    // SAFETY: ctx field reads, 4 bytes each.
    let (w0, w1, w2, w3) = unsafe {
        (
            read_volatile(addr_of!((*sa).user_ip6[0])),
            read_volatile(addr_of!((*sa).user_ip6[1])),
            read_volatile(addr_of!((*sa).user_ip6[2])),
            read_volatile(addr_of!((*sa).user_ip6[3])),
        )
    };
    if w0 == 0 && w1 == 0 && w2 == 0xffffu32.to_be() {
        Some(w3)
    } else {
        None
    }
}

/// The socket's mark (`SO_MARK`).
#[inline(always)]
pub(crate) fn mark(sa: *mut bpf_sock_addr) -> u32 {
    // SAFETY: ctx field reads; `sk` is never null in sock_addr programs (PTR_TO_SOCKET), and
    // the verifier checks the read of its `mark`.
    unsafe {
        let sk = read_volatile(addr_of!((*sa).__bindgen_anon_1.sk));
        read_volatile(addr_of!((*sk).mark))
    }
}
