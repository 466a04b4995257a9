//! UDP: one socket receives every datagram sent to an alias (IP_ORIGDSTADDR tells which);
//! each (client, destination) pair is a flow with a stream of its own through the tunnel.
//! Replies leave from a socket bound to the alias itself, so that a connected client socket
//! accepts them, and the recvmsg hook shows the application the cluster address.

use std::collections::HashMap;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use kt_common::tunnel::{self, read_data, write_data, write_frame};
use kt_common::wire::{Frame, Open};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::OrigDst;
use crate::tunnel::Tunnel;

/// A flow that sends nothing either way for this long ends.
pub const IDLE: Duration = Duration::from_secs(60);

/// The steered socket: loopback, any port, original destinations reported per datagram.
pub fn socket() -> io::Result<std::net::UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid int option on our own socket.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_RECVORIGDSTADDR,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    s.set_recv_buffer_size(4 << 20)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// recvmsg(2) with the IP_ORIGDSTADDR control message: (length, source, original destination).
pub fn recv_orig(fd: i32, buf: &mut [u8]) -> io::Result<(usize, SocketAddrV4, SocketAddrV4)> {
    // SAFETY: plain C structs, zero is a valid initial value for all of them.
    let mut src: libc::sockaddr_in = unsafe { zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 8]; // aligned room for one cmsg with a sockaddr_in
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (&mut src as *mut libc::sockaddr_in).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 8]>();
    // SAFETY: msg points at live buffers of the lengths it states.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut dst = None;
    // SAFETY: walking the control buffer the kernel filled, with the libc CMSG macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::IPPROTO_IP && (*c).cmsg_type == libc::IP_ORIGDSTADDR {
                let sa = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::sockaddr_in);
                dst = Some(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
                    u16::from_be(sa.sin_port),
                ));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let dst = dst.ok_or_else(|| io::Error::other("no IP_ORIGDSTADDR on a datagram"))?;
    let src = SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(src.sin_addr.s_addr)),
        u16::from_be(src.sin_port),
    );
    Ok((n as usize, src, dst))
}

type FlowKey = (SocketAddrV4, SocketAddrV4);

/// Receives forever.
pub async fn serve(sock: UdpSocket, orig: OrigDst, tunnel: Tunnel) {
    let flows: Arc<Mutex<HashMap<FlowKey, mpsc::Sender<Bytes>>>> = Arc::default();
    let replies = ReplySockets::default();
    let mut buf = vec![0u8; 65_536];
    loop {
        let got = sock
            .async_io(Interest::READABLE, || recv_orig(sock.as_raw_fd(), &mut buf))
            .await;
        let (n, client, alias) = match got {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "udp receive failed");
                continue;
            }
        };
        let Some(dst) = orig.resolve(SocketAddr::V4(alias)) else {
            continue;
        };
        let key = (client, alias);
        let datagram = Bytes::copy_from_slice(&buf[..n]);
        let existing = flows.lock().expect("flows lock").get(&key).cloned();
        if let Some(tx) = existing
            && tx.try_send(datagram.clone()).is_ok()
        {
            continue;
        }
        let (tx, rx) = mpsc::channel(256);
        let _ = tx.try_send(datagram);
        flows.lock().expect("flows lock").insert(key, tx);
        let (flows, replies, tunnel) = (flows.clone(), replies.clone(), tunnel.clone());
        tokio::spawn(
            async move {
                if let Err(e) = flow(rx, client, alias, dst, &tunnel, &replies).await {
                    tracing::debug!(error = %e, "udp flow ended");
                }
                flows.lock().expect("flows lock").remove(&key);
            }
            .instrument(tracing::debug_span!("udp", %dst, %client)),
        );
    }
}

async fn flow(
    mut rx: mpsc::Receiver<Bytes>,
    client: SocketAddrV4,
    alias: SocketAddrV4,
    dst: SocketAddr,
    tunnel: &Tunnel,
    replies: &ReplySockets,
) -> Result<(), kt_common::tunnel::TunnelError> {
    let reply = replies.get(alias)?;
    let mut stream = tunnel.stream().await?;
    write_frame(&mut stream, &Frame::Open(Open::Udp(dst))).await?;
    let (mut sr, mut sw) = tokio::io::split(stream);
    let up = async {
        while let Ok(Some(d)) = tokio::time::timeout(IDLE, rx.recv()).await {
            write_data(&mut sw, &d).await?;
        }
        Ok::<_, kt_common::tunnel::TunnelError>(())
    };
    let down = async {
        tunnel::expect_ok(&mut sr).await?;
        while let Ok(Ok(Some(d))) = tokio::time::timeout(IDLE, read_data(&mut sr)).await {
            reply.send_to(&d, client).await?;
        }
        Ok(())
    };
    tokio::select! {
        r = up => r,
        r = down => r,
    }
}

/// Sockets bound to aliases, to send replies from; one per alias:port, shared by its flows.
#[derive(Clone, Default)]
struct ReplySockets(Arc<Mutex<HashMap<SocketAddrV4, Arc<UdpSocket>>>>);

impl ReplySockets {
    fn get(&self, alias: SocketAddrV4) -> io::Result<Arc<UdpSocket>> {
        let mut map = self.0.lock().expect("reply sockets lock");
        if let Some(s) = map.get(&alias) {
            return Ok(s.clone());
        }
        let s = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::V4(alias).into())?;
        s.set_nonblocking(true)?;
        let s = Arc::new(UdpSocket::from_std(s.into())?);
        map.insert(alias, s.clone());
        Ok(s)
    }
}
