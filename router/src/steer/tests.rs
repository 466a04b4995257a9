//! The tc programs on crafted packets through `BPF_PROG_TEST_RUN` (root). Checksums are
//! verified from scratch here: on a veth, checksum offload would hide a wrong one. What this
//! cannot see: test packets are CHECKSUM_NONE, and `BPF_F_PSEUDO_HDR` only changes how the
//! helpers treat CHECKSUM_PARTIAL and CHECKSUM_COMPLETE packets, so removing it keeps these
//! tests green (and veths, which never compute a checksum, keep real traffic working too).
//! It is set as the kernel's own NAT sets it for an address in the pseudo-header.

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use kt_common::steer::{AddrFilter, IPPROTO_TCP, IPPROTO_UDP, flow_state};

use super::*;

const CLUSTER_IP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
const SHADOW: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 7), 8080);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 5);
const OTHER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 11), 80);

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

const ETH: usize = 14;
const IP: usize = 20;

/// A crafted Ethernet + IPv4 + TCP/UDP/ICMP packet with correct checksums.
#[derive(Clone)]
struct Pkt {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    proto: u8,
    flags: u8,
    payload: &'static [u8],
    /// IPv4 flags + fragment offset (host order).
    frag: u16,
    /// UDP without a checksum (0).
    no_udp_csum: bool,
}

impl Pkt {
    fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Pkt {
        Pkt {
            src,
            dst,
            proto: IPPROTO_TCP,
            flags,
            payload: b"",
            frag: 0x4000,
            no_udp_csum: false,
        }
    }

    fn udp(src: SocketAddrV4, dst: SocketAddrV4) -> Pkt {
        Pkt {
            proto: IPPROTO_UDP,
            payload: b"query",
            ..Pkt::tcp(src, dst, 0)
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let l4: Vec<u8> = match self.proto {
            IPPROTO_TCP => {
                let mut h = Vec::new();
                h.extend(self.src.port().to_be_bytes());
                h.extend(self.dst.port().to_be_bytes());
                h.extend(1000u32.to_be_bytes());
                h.extend(if self.flags & ACK != 0 { 2000u32 } else { 0 }.to_be_bytes());
                h.extend([0x50, self.flags]);
                h.extend(64240u16.to_be_bytes());
                h.extend([0, 0, 0, 0]);
                h.extend(self.payload);
                h
            }
            IPPROTO_UDP => {
                let mut h = Vec::new();
                h.extend(self.src.port().to_be_bytes());
                h.extend(self.dst.port().to_be_bytes());
                h.extend(((8 + self.payload.len()) as u16).to_be_bytes());
                h.extend([0, 0]);
                h.extend(self.payload);
                h
            }
            // ICMP echo request.
            _ => {
                let mut h = vec![8, 0, 0, 0, 0, 1, 0, 1];
                h.extend(self.payload);
                let c = fold(sum(&h, 0));
                h[2..4].copy_from_slice(&c.to_be_bytes());
                h
            }
        };
        let mut p = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
        p.extend([0x45, 0]);
        p.extend(((IP + l4.len()) as u16).to_be_bytes());
        p.extend([0x12, 0x34]);
        p.extend(self.frag.to_be_bytes());
        p.extend([64, self.proto, 0, 0]);
        p.extend(self.src.ip().octets());
        p.extend(self.dst.ip().octets());
        let c = fold(sum(&p[ETH..ETH + IP], 0));
        p[ETH + 10..ETH + 12].copy_from_slice(&c.to_be_bytes());
        p.extend(l4);
        let at = csum_at(self.proto);
        if self.proto == IPPROTO_TCP || (self.proto == IPPROTO_UDP && !self.no_udp_csum) {
            let mut c = fold(pseudo(&p));
            if self.proto == IPPROTO_UDP && c == 0 {
                c = 0xffff;
            }
            p[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        p
    }
}

fn csum_at(proto: u8) -> usize {
    ETH + IP + if proto == IPPROTO_TCP { 16 } else { 6 }
}

/// Ones' complement sum of big-endian 16-bit words.
fn sum(data: &[u8], mut s: u32) -> u32 {
    for c in data.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    s
}

fn fold(mut s: u32) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// The L4 segment's sum with its pseudo-header.
fn pseudo(p: &[u8]) -> u32 {
    let l4 = &p[ETH + IP..];
    let mut s = sum(&p[ETH + 12..ETH + 20], 0);
    s += u32::from(p[ETH + 9]) + l4.len() as u32;
    sum(l4, s)
}

/// What a receiver would read from a packet, after checking both checksums from scratch.
#[derive(Debug, PartialEq)]
struct Seen {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    udp_csum_zero: bool,
}

fn seen(p: &[u8]) -> Seen {
    assert_eq!(fold(sum(&p[ETH..ETH + IP], 0)), 0, "IPv4 header checksum");
    let proto = p[ETH + 9];
    let at = csum_at(proto);
    let zero = proto == IPPROTO_UDP && p[at..at + 2] == [0, 0];
    if !zero {
        assert_eq!(fold(pseudo(p)), 0, "L4 checksum (proto {proto})");
    }
    let addr = |o: usize| Ipv4Addr::new(p[o], p[o + 1], p[o + 2], p[o + 3]);
    let port = |o: usize| u16::from_be_bytes([p[o], p[o + 1]]);
    Seen {
        src: SocketAddrV4::new(addr(ETH + 12), port(ETH + IP)),
        dst: SocketAddrV4::new(addr(ETH + 16), port(ETH + IP + 2)),
        udp_csum_zero: zero,
    }
}

fn run(s: &Steering, prog: &str, pkt: &[u8]) -> Vec<u8> {
    let p: &SchedClassifier = s.ebpf.program(prog).unwrap().try_into().unwrap();
    let mut out = vec![0u8; pkt.len() + 256];
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    assert_eq!(r.return_value, 0, "{prog} must always return TC_ACT_OK");
    out.truncate(r.data_size_out as usize);
    assert_eq!(out.len(), pkt.len(), "{prog} changed the packet's length");
    out
}

/// The pod's packet through the ingress program.
fn out_of_pod(s: &Steering, p: &Pkt) -> Vec<u8> {
    run(s, INGRESS, &p.bytes())
}

/// A packet to the pod through the egress program.
fn into_pod(s: &Steering, p: &Pkt) -> Vec<u8> {
    run(s, EGRESS, &p.bytes())
}

fn client(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(CLIENT, port)
}

fn steering() -> Steering {
    let mut s = Steering::load().expect("load");
    s.steer(CLUSTER_IP, Proto::Tcp, SHADOW).unwrap();
    s.steer(CLUSTER_IP, Proto::Udp, SHADOW).unwrap();
    s
}

fn count(s: &Steering, c: u32) -> u64 {
    s.counters().unwrap()[c as usize]
}

fn flow_keys(s: &Steering, map: &str) -> Vec<FlowKey> {
    s.flows(map).keys().map(Result::unwrap).collect()
}

#[test]
#[ignore = "needs root: loads the tc programs and runs them with BPF_PROG_TEST_RUN"]
fn a_tcp_flow_goes_to_the_shadow_and_its_replies_come_from_the_address_called() {
    let s = steering();
    let c = client(40000);
    let syn = seen(&out_of_pod(&s, &Pkt::tcp(c, CLUSTER_IP, SYN)));
    assert_eq!((syn.src, syn.dst), (c, SHADOW));
    let syn_ack = seen(&into_pod(&s, &Pkt::tcp(SHADOW, c, SYN | ACK)));
    assert_eq!((syn_ack.src, syn_ack.dst), (CLUSTER_IP, c));
    let data = Pkt {
        payload: b"GET / HTTP/1.1\r\nHost: nginx\r\n\r\n",
        ..Pkt::tcp(c, CLUSTER_IP, ACK | PSH)
    };
    let out = out_of_pod(&s, &data);
    assert_eq!((seen(&out).src, seen(&out).dst), (c, SHADOW));
    assert_eq!(&out[ETH + IP + 20..], data.payload, "payload untouched");
    assert_eq!(count(&s, counter::STEERED), 1);
    assert_eq!(count(&s, counter::REWRITTEN), 3);
    assert_eq!(count(&s, counter::ERROR), 0);
}

#[test]
#[ignore = "needs root: loads the tc programs and runs them with BPF_PROG_TEST_RUN"]
fn packets_that_match_nothing_leave_byte_for_byte() {
    let s = steering();
    let c = client(40010);
    let cases = [
        ("another Service", INGRESS, Pkt::tcp(c, OTHER, SYN)),
        // A connection opened before steering began stays with the original pod.
        (
            "a non-SYN without a flow",
            INGRESS,
            Pkt::tcp(c, CLUSTER_IP, ACK),
        ),
        (
            "ICMP",
            INGRESS,
            Pkt {
                proto: 1,
                ..Pkt::tcp(c, CLUSTER_IP, 0)
            },
        ),
        (
            "a first fragment",
            INGRESS,
            Pkt {
                frag: 0x2000,
                ..Pkt::udp(c, CLUSTER_IP)
            },
        ),
        (
            "a later fragment",
            INGRESS,
            Pkt {
                frag: 0x0010,
                ..Pkt::udp(c, CLUSTER_IP)
            },
        ),
        (
            "the shadow without a flow",
            EGRESS,
            Pkt::tcp(SHADOW, c, SYN | ACK),
        ),
        ("the original pod's reply", EGRESS, Pkt::tcp(OTHER, c, ACK)),
    ];
    for (what, prog, p) in cases {
        let b = p.bytes();
        assert_eq!(run(&s, prog, &b), b, "{what}");
    }
    let mut arp = Pkt::tcp(c, CLUSTER_IP, SYN).bytes();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    assert_eq!(run(&s, INGRESS, &arp), arp, "not IPv4");
    assert_eq!(count(&s, counter::FRAGMENT), 2);
    assert_eq!(count(&s, counter::STEERED), 0);
    assert!(flow_keys(&s, "KT_FLOWS_FWD").is_empty());
}

#[test]
#[ignore = "needs root: loads the tc programs and runs them with BPF_PROG_TEST_RUN"]
fn udp_is_rewritten_with_its_checksum_and_a_missing_checksum_stays_missing() {
    let s = steering();
    let c = client(5353);
    let q = seen(&out_of_pod(&s, &Pkt::udp(c, CLUSTER_IP)));
    assert_eq!((q.src, q.dst, q.udp_csum_zero), (c, SHADOW, false));
    let a = seen(&into_pod(&s, &Pkt::udp(SHADOW, c)));
    assert_eq!((a.src, a.dst, a.udp_csum_zero), (CLUSTER_IP, c, false));
    let bare = Pkt {
        no_udp_csum: true,
        ..Pkt::udp(c, CLUSTER_IP)
    };
    let q = seen(&out_of_pod(&s, &bare));
    assert_eq!((q.src, q.dst, q.udp_csum_zero), (c, SHADOW, true));
    let bare = Pkt {
        no_udp_csum: true,
        ..Pkt::udp(SHADOW, c)
    };
    let a = seen(&into_pod(&s, &bare));
    assert_eq!((a.src, a.dst, a.udp_csum_zero), (CLUSTER_IP, c, true));
}

#[test]
#[ignore = "needs root: loads the tc programs and runs them with BPF_PROG_TEST_RUN"]
fn unsteering_sends_new_flows_to_the_original_and_keeps_flows_under_way() {
    let mut s = steering();
    let (old, new) = (client(40020), client(40021));
    out_of_pod(&s, &Pkt::tcp(old, CLUSTER_IP, SYN));
    s.unsteer(CLUSTER_IP, Proto::Tcp).unwrap();
    s.unsteer(CLUSTER_IP, Proto::Tcp).unwrap();
    let ack = seen(&out_of_pod(&s, &Pkt::tcp(old, CLUSTER_IP, ACK)));
    assert_eq!(ack.dst, SHADOW, "a flow under way keeps its shadow");
    let reply = seen(&into_pod(&s, &Pkt::tcp(SHADOW, old, ACK)));
    assert_eq!(reply.src, CLUSTER_IP);
    let b = Pkt::tcp(new, CLUSTER_IP, SYN).bytes();
    assert_eq!(run(&s, INGRESS, &b), b, "a new flow reaches the original");
}

#[test]
#[ignore = "needs root: loads the tc programs and runs them with BPF_PROG_TEST_RUN"]
fn a_fin_or_rst_closes_the_flow_in_both_directions_and_closed_flows_expire() {
    let mut s = steering();
    let c = client(40030);
    out_of_pod(&s, &Pkt::tcp(c, CLUSTER_IP, SYN));
    into_pod(&s, &Pkt::tcp(SHADOW, c, SYN | ACK));
    into_pod(&s, &Pkt::tcp(SHADOW, c, FIN | ACK));
    for map in ["KT_FLOWS_FWD", "KT_FLOWS_REV"] {
        let flows = s.flows(map);
        let states: Vec<u16> = flows.iter().map(|e| e.unwrap().1.state).collect();
        assert_eq!(states, [flow_state::CLOSING], "{map}");
    }
    // Still translated while the close completes...
    let last_ack = seen(&out_of_pod(&s, &Pkt::tcp(c, CLUSTER_IP, ACK)));
    assert_eq!(last_ack.dst, SHADOW);
    // ...and gone once it has been idle for the closing timeout.
    s.set_timeouts(Timeouts {
        closing_ns: 1,
        ..Timeouts::default()
    })
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1));
    let b = Pkt::tcp(c, CLUSTER_IP, ACK).bytes();
    assert_eq!(run(&s, INGRESS, &b), b);
    let b = Pkt::tcp(SHADOW, c, ACK).bytes();
    assert_eq!(run(&s, EGRESS, &b), b);
    assert_eq!(count(&s, counter::EXPIRED), 2);
    assert!(flow_keys(&s, "KT_FLOWS_FWD").is_empty());
    assert!(flow_keys(&s, "KT_FLOWS_REV").is_empty());

    // An RST closes too; a new SYN on the same addresses after unsteering is the original's,
    // and no later packet of it matches the old flow.
    s.set_timeouts(Timeouts::default()).unwrap();
    let c = client(40031);
    out_of_pod(&s, &Pkt::tcp(c, CLUSTER_IP, SYN));
    out_of_pod(&s, &Pkt::tcp(c, CLUSTER_IP, RST));
    s.unsteer(CLUSTER_IP, Proto::Tcp).unwrap();
    for flags in [SYN, ACK] {
        let b = Pkt::tcp(c, CLUSTER_IP, flags).bytes();
        assert_eq!(run(&s, INGRESS, &b), b, "flags {flags:#x}");
    }
}

#[test]
#[ignore = "needs root: loads the tc programs and runs them with BPF_PROG_TEST_RUN"]
fn idle_udp_flows_expire_and_are_steered_afresh() {
    let mut s = steering();
    s.set_timeouts(Timeouts {
        udp_ns: 1,
        ..Timeouts::default()
    })
    .unwrap();
    let c = client(5354);
    out_of_pod(&s, &Pkt::udp(c, CLUSTER_IP));
    std::thread::sleep(std::time::Duration::from_millis(1));
    let again = seen(&out_of_pod(&s, &Pkt::udp(c, CLUSTER_IP)));
    assert_eq!(again.dst, SHADOW);
    assert_eq!(count(&s, counter::EXPIRED), 1);
    assert_eq!(count(&s, counter::STEERED), 2);
}

#[test]
#[ignore = "needs root: loads the tc programs and runs them with BPF_PROG_TEST_RUN"]
fn the_flow_maps_stay_within_their_capacity() {
    let mut s = Steering::load_with(Some(16), None).expect("load");
    s.steer(CLUSTER_IP, Proto::Tcp, SHADOW).unwrap();
    for port in 41000..41200 {
        out_of_pod(&s, &Pkt::tcp(client(port), CLUSTER_IP, SYN));
    }
    for map in ["KT_FLOWS_FWD", "KT_FLOWS_REV"] {
        let n = flow_keys(&s, map).len();
        assert!((1..=16).contains(&n), "{map} holds {n} entries");
    }
    // The newest flow is still known in both directions.
    let last = client(41199);
    assert_eq!(
        seen(&out_of_pod(&s, &Pkt::tcp(last, CLUSTER_IP, ACK))).dst,
        SHADOW
    );
    assert_eq!(
        seen(&into_pod(&s, &Pkt::tcp(SHADOW, last, ACK))).src,
        CLUSTER_IP
    );
    assert_eq!(count(&s, counter::STEERED), 200);
}

#[test]
#[ignore = "needs root: loads the tc programs and runs them with BPF_PROG_TEST_RUN"]
fn the_programs_act_only_while_something_is_steered_or_a_flow_lives() {
    let mut s = Steering::load().expect("load");
    assert!(!s.active().unwrap(), "nothing steered: off");
    s.steer(CLUSTER_IP, Proto::Tcp, SHADOW).unwrap();
    assert!(s.active().unwrap(), "on before the first steering entry");
    let c = client(44000);
    assert_eq!(
        seen(&out_of_pod(&s, &Pkt::tcp(c, CLUSTER_IP, SYN))).dst,
        SHADOW
    );
    s.unsteer(CLUSTER_IP, Proto::Tcp).unwrap();
    let swept = s.sweep().unwrap();
    assert_eq!(
        (swept.live, swept.active),
        (2, true),
        "the flow lives on (both directions), so the programs stay on"
    );
    assert_eq!(
        seen(&out_of_pod(&s, &Pkt::tcp(c, CLUSTER_IP, ACK))).dst,
        SHADOW,
        "and it keeps its shadow"
    );
    // It idles out: the sweep removes it and turns the programs off.
    idle_out_every_flow(&mut s);
    assert_eq!(
        s.sweep().unwrap(),
        Swept {
            live: 0,
            removed: 2,
            active: false
        }
    );
    assert!(flow_keys(&s, "KT_FLOWS_FWD").is_empty() && flow_keys(&s, "KT_FLOWS_REV").is_empty());
    assert!(!s.active().unwrap());
}

/// Makes every flow idle past its timeout (1 ns), for the next sweep to remove.
fn idle_out_every_flow(s: &mut Steering) {
    s.set_timeouts(Timeouts {
        tcp_ns: 1,
        udp_ns: 1,
        closing_ns: 1,
    })
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1));
}

/// Whether the address filter has `a`'s bit.
fn in_filter(s: &Steering, a: SocketAddrV4) -> bool {
    s.filter()
        .unwrap()
        .has(u32::from(*a.ip()).to_be(), a.port().to_be())
}

#[test]
#[ignore = "needs root: loads the tc programs and runs them with BPF_PROG_TEST_RUN"]
fn the_address_filter_holds_what_is_steered_and_what_live_flows_use() {
    let mut s = Steering::load().expect("load");
    s.retire_after = std::time::Duration::ZERO;
    s.steer(CLUSTER_IP, Proto::Tcp, SHADOW).unwrap();
    assert!(in_filter(&s, CLUSTER_IP) && in_filter(&s, SHADOW));
    assert!(!in_filter(&s, OTHER), "nothing else");
    let c = client(45000);
    assert_eq!(
        seen(&out_of_pod(&s, &Pkt::tcp(c, CLUSTER_IP, SYN))).dst,
        SHADOW
    );
    s.unsteer(CLUSTER_IP, Proto::Tcp).unwrap();
    s.sweep().unwrap();
    assert!(
        in_filter(&s, CLUSTER_IP) && in_filter(&s, SHADOW),
        "kept for the flow that lives on"
    );
    // The programs take the filter's word: without its bits, the flow's packets pass as they
    // are, in both directions.
    s.set_filter(AddrFilter::default()).unwrap();
    let data = Pkt::tcp(c, CLUSTER_IP, ACK | PSH);
    assert_eq!(out_of_pod(&s, &data), data.bytes());
    let reply = Pkt::tcp(SHADOW, c, ACK);
    assert_eq!(into_pod(&s, &reply), reply.bytes());
    // The sweep puts them back while the flow lives, and clears them once it has idled out.
    s.sweep().unwrap();
    assert_eq!(seen(&out_of_pod(&s, &data)).dst, SHADOW);
    assert_eq!(seen(&into_pod(&s, &reply)).src, CLUSTER_IP);
    idle_out_every_flow(&mut s);
    s.sweep().unwrap();
    assert_eq!(s.filter().unwrap(), AddrFilter::default());
}

#[test]
#[ignore = "needs root: loads the tc programs and runs them with BPF_PROG_TEST_RUN"]
fn a_removed_steering_entry_keeps_its_bits_for_a_moment() {
    let mut s = Steering::load().expect("load");
    s.retire_after = std::time::Duration::from_secs(3600);
    s.steer(CLUSTER_IP, Proto::Tcp, SHADOW).unwrap();
    s.unsteer(CLUSTER_IP, Proto::Tcp).unwrap();
    s.sweep().unwrap();
    assert!(
        in_filter(&s, CLUSTER_IP) && in_filter(&s, SHADOW),
        "a program run that found the entry may still be adding its flow"
    );
    s.retire_after = std::time::Duration::ZERO;
    s.sweep().unwrap();
    assert!(!in_filter(&s, CLUSTER_IP) && !in_filter(&s, SHADOW));
}

#[test]
#[ignore = "needs root: loads the tc programs and runs them with BPF_PROG_TEST_RUN"]
fn off_the_programs_leave_even_a_known_flow_alone() {
    let mut s = steering();
    let c = client(44100);
    assert_eq!(
        seen(&out_of_pod(&s, &Pkt::tcp(c, CLUSTER_IP, SYN))).dst,
        SHADOW
    );
    s.set_active(false).unwrap();
    let data = Pkt::tcp(c, CLUSTER_IP, ACK | PSH);
    assert_eq!(out_of_pod(&s, &data), data.bytes(), "untouched");
    let reply = Pkt::tcp(SHADOW, c, ACK);
    assert_eq!(into_pod(&s, &reply), reply.bytes(), "untouched");
    s.set_active(true).unwrap();
    assert_eq!(seen(&out_of_pod(&s, &data)).dst, SHADOW);
    assert_eq!(seen(&into_pod(&s, &reply)).src, CLUSTER_IP);
}

/// A bpf filesystem of the test's own on a temporary folder: unmounted, with every pin on
/// it, when dropped.
struct Bpffs(std::path::PathBuf);

impl Bpffs {
    fn new(name: &str) -> Bpffs {
        let dir = std::env::temp_dir().join(format!("kt-bpffs-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("folder");
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: mount(2) with NUL-terminated strings and no data.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                c.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        let fs = Bpffs(dir);
        assert_eq!(rc, 0, "mount: {}", std::io::Error::last_os_error());
        fs
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let c = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: umount2(2) with a NUL-terminated path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
#[ignore = "needs root: mounts a bpf filesystem and loads the tc programs"]
fn flows_pinned_by_one_router_carry_on_in_the_next() {
    let fs = Bpffs::new("carry");
    let pins = fs.0.join("kt-router");
    prepare_pins(&pins).expect("a folder on bpffs");
    let c = client(42000);
    {
        let mut s = Steering::load_pinned(&pins).expect("load");
        s.steer(CLUSTER_IP, Proto::Tcp, SHADOW).unwrap();
        assert_eq!(
            seen(&out_of_pod(&s, &Pkt::tcp(c, CLUSTER_IP, SYN))).dst,
            SHADOW
        );
    }
    // The router is gone (its programs and map handles closed); the next one starts with no
    // steering yet, as a restarted router does before it has listed the cluster.
    prepare_pins(&pins).expect("the pins fit");
    let mut s = Steering::load_pinned(&pins).expect("load again");
    let swept = s.sweep().expect("the sweep after loading");
    assert_eq!(
        (swept.live, swept.active),
        (2, true),
        "the flow taken over turns the programs on"
    );
    let data = Pkt::tcp(c, CLUSTER_IP, ACK | PSH);
    assert_eq!(
        seen(&out_of_pod(&s, &data)).dst,
        SHADOW,
        "the connection steered before the restart keeps its shadow"
    );
    assert_eq!(
        seen(&into_pod(&s, &Pkt::tcp(SHADOW, c, ACK))).src,
        CLUSTER_IP,
        "and its replies their address"
    );
    assert_eq!(
        seen(&out_of_pod(&s, &Pkt::tcp(client(42001), CLUSTER_IP, SYN))).dst,
        CLUSTER_IP,
        "a new connection waits for the new router's steering"
    );
    // A router without pins forgets it.
    let fresh = Steering::load().expect("load without pins");
    assert_eq!(seen(&out_of_pod(&fresh, &data)).dst, CLUSTER_IP);

    drop(s);
    unpin(&pins).expect("unpin");
    assert!(!pins.exists(), "the pins and their folder are gone");
}

#[test]
#[ignore = "needs root: mounts a bpf filesystem and loads the tc programs"]
fn a_pinned_flow_map_that_does_not_fit_is_replaced() {
    let fs = Bpffs::new("misfit");
    let pins = fs.0.join("kt-router");
    std::fs::create_dir_all(&pins).expect("folder");
    {
        // Another version's maps: another capacity.
        let mut s = Steering::load_with(Some(16), Some(&pins)).expect("load");
        s.steer(CLUSTER_IP, Proto::Tcp, SHADOW).unwrap();
        out_of_pod(&s, &Pkt::tcp(client(42100), CLUSTER_IP, SYN));
        assert_eq!(flow_keys(&s, "KT_FLOWS_FWD").len(), 1);
    }
    prepare_pins(&pins).expect("prepare");
    let s = Steering::load_pinned(&pins).expect("load");
    assert!(flow_keys(&s, "KT_FLOWS_FWD").is_empty(), "a fresh map");
    let info = MapData::from_pin(pins.join("KT_FLOWS_FWD"))
        .and_then(|m| m.info())
        .expect("the new pin");
    assert_eq!(info.max_entries(), kt_common::steer::MAX_FLOWS);
}

#[test]
fn pins_need_a_bpf_filesystem() {
    let dir = std::env::temp_dir().join(format!("kt-not-bpffs-{}", std::process::id()));
    let err = prepare_pins(&dir).expect_err("not bpffs");
    let _ = std::fs::remove_dir(&dir);
    assert!(
        format!("{err:#}").contains("is not on a bpf filesystem"),
        "{err:#}"
    );
}
