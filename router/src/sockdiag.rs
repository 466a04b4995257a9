//! One question to the kernel's socket diagnostics (NETLINK_SOCK_DIAG): the cookie of the TCP
//! socket of this network namespace whose local address is `local` and whose peer is `peer`.
//! A node's mesh proxy asks it about a hostNetwork caller (whose socket lives in the proxy's
//! own namespace, so there is no flow of the tc programs to read): the cookie is what the
//! node's sock_addr programs keyed that socket's original destination by
//! (`bpf_get_socket_cookie()` and the diagnostics' `idiag_cookie` are the same number).

use std::io;
use std::net::{IpAddr, SocketAddrV4};

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr};

/// The cookie of the TCP socket from `local` to `peer` in the calling thread's network
/// namespace; `Ok(None)` when there is none (it closed meanwhile).
pub fn tcp_cookie(local: SocketAddrV4, peer: SocketAddrV4) -> io::Result<Option<u64>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut id = SocketId::new_v4();
    id.source_address = IpAddr::V4(*local.ip());
    id.source_port = local.port();
    id.destination_address = IpAddr::V4(*peer.ip());
    id.destination_port = peer.port();
    // All ones: "any cookie" (INET_DIAG_NOCOOKIE); the 4-tuple names one socket.
    id.cookie = [0xff; 8];
    let mut header = NetlinkHeader::default();
    // Not a dump: the kernel looks the one socket up by its addresses.
    header.flags = NLM_F_REQUEST;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family: AF_INET,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: id,
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut reply = Vec::with_capacity(4096);
    socket.recv(&mut reply, 0)?;
    answer(&reply)
}

/// The cookie in the kernel's reply to one lookup.
fn answer(reply: &[u8]) -> io::Result<Option<u64>> {
    let msg = <NetlinkMessage<SockDiagMessage>>::deserialize(reply)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag: {e}")))?;
    match msg.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
            Ok(Some(cookie(r.header.socket_id.cookie)))
        }
        NetlinkPayload::Error(e) => match e.code {
            Some(code) if -code.get() == libc::ENOENT => Ok(None),
            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
            None => Ok(None),
        },
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("sock_diag: unexpected reply {other:?}"),
        )),
    }
}

/// `idiag_cookie` is two 32-bit words in the host's order, the low one first.
fn cookie(raw: [u8; 8]) -> u64 {
    let lo = u32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let hi = u32::from_ne_bytes([raw[4], raw[5], raw[6], raw[7]]);
    (u64::from(hi) << 32) | u64::from(lo)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    use super::*;

    fn so_cookie(s: &TcpStream) -> u64 {
        let mut v: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: getsockopt into a u64 of the length given.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&raw mut v).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "SO_COOKIE: {}", io::Error::last_os_error());
        v
    }

    fn v4(a: std::net::SocketAddr) -> SocketAddrV4 {
        match a {
            std::net::SocketAddr::V4(a) => a,
            other => panic!("not IPv4: {other}"),
        }
    }

    #[test]
    fn the_cookie_of_each_end_of_a_loopback_connection() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (a, _) = l.accept().unwrap();
        let (cl, al) = (v4(c.local_addr().unwrap()), v4(a.local_addr().unwrap()));
        assert_eq!(tcp_cookie(cl, al).unwrap(), Some(so_cookie(&c)));
        assert_eq!(tcp_cookie(al, cl).unwrap(), Some(so_cookie(&a)));
        assert_ne!(so_cookie(&c), so_cookie(&a));
        drop((c, a));
        let gone = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1);
        assert_eq!(tcp_cookie(gone, al).unwrap(), None, "no such socket");
    }

    #[test]
    fn cookies_are_read_as_the_kernel_writes_them() {
        let c: u64 = 0x0123_4567_89ab_cdef;
        let mut raw = [0; 8];
        raw[..4].copy_from_slice(&(c as u32).to_ne_bytes());
        raw[4..].copy_from_slice(&((c >> 32) as u32).to_ne_bytes());
        assert_eq!(cookie(raw), c);
    }
}
