//! UDP: one socket receives every datagram sent to an alias (IP_ORIGDSTADDR tells which);
//! each (client, destination) pair is a flow with a stream of its own through the tunnel.
//! Replies leave from a socket bound to the alias itself, so that a connected client socket
//! accepts them, and the recvmsg hook shows the application the cluster address.
//!
//! What a flow may hold is bounded: one stream however fast its datagrams come (they queue,
//! in order, while the stream opens or the tunnel is slow), a queue of [`Limits::queue_len`]
//! datagrams and [`Limits::queue_bytes`] bytes (more are dropped, as a full socket buffer
//! drops them), [`Limits::max_flows`] flows in all, and the sockets bound to aliases are
//! closed with the last flow that replies from them.

use std::collections::HashMap;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use kt_common::tunnel::{self, TunnelError, read_data, write_data, write_frame};
use kt_common::wire::{Frame, Open};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

use super::{OrigDst, Streams};

/// A flow that carries nothing either way for this long ends.
pub const IDLE: Duration = Duration::from_secs(60);
/// Most flows at once. Each holds a stream of the tunnel (at most `MAX_STREAMS`, shared with
/// TCP) and may hold a socket bound to its alias: with the usual soft limit of 1024 open
/// files, more would leave no descriptors for TCP connections.
pub const MAX_FLOWS: usize = 512;

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

/// The bounds of the flow table.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A flow that carries nothing either way for this long ends.
    pub idle: Duration,
    /// Most flows at once; a new flow past it ends the one idle longest.
    pub max_flows: usize,
    /// Most datagrams waiting for a flow's stream; more are dropped.
    pub queue_len: usize,
    /// Most payload bytes waiting for a flow's stream (about a socket's receive buffer); more
    /// are dropped.
    pub queue_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            idle: IDLE,
            max_flows: MAX_FLOWS,
            queue_len: 256,
            queue_bytes: 256 * 1024,
        }
    }
}

/// Receives forever.
pub async fn serve<S: Streams>(sock: UdpSocket, orig: OrigDst, streams: S) {
    let flows = Flows::new(streams, Limits::default());
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
        flows.datagram(client, alias, dst, &buf[..n]);
    }
}

/// A flow: the client and the alias it sent to.
type FlowKey = (SocketAddrV4, SocketAddrV4);

/// The flow table: each (client, alias) pair has one queue and one task that carries it
/// through one stream; cheap to clone.
pub struct Flows<S>(Arc<Table<S>>);

impl<S> Clone for Flows<S> {
    fn clone(&self) -> Self {
        Flows(self.0.clone())
    }
}

struct Table<S> {
    streams: S,
    limits: Limits,
    flows: Mutex<HashMap<FlowKey, Entry>>,
    replies: ReplySockets,
    /// Where flows' activity times count from.
    epoch: Instant,
    dropped: AtomicU64,
}

struct Entry {
    tx: mpsc::Sender<Bytes>,
    state: Arc<FlowState>,
}

/// What a flow's task and the receive loop share.
#[derive(Default)]
struct FlowState {
    /// Payload bytes queued for the stream.
    queued: AtomicUsize,
    /// Milliseconds from the table's epoch to the flow's latest datagram either way.
    last: AtomicU64,
    /// Datagrams dropped on a full queue.
    dropped: AtomicU64,
}

impl<S: Streams> Flows<S> {
    /// An empty table whose flows open their streams with `streams`.
    pub fn new(streams: S, limits: Limits) -> Flows<S> {
        Flows(Arc::new(Table {
            streams,
            limits,
            flows: Mutex::default(),
            replies: ReplySockets::default(),
            epoch: Instant::now(),
            dropped: AtomicU64::new(0),
        }))
    }

    /// Hands a datagram from `client` to `alias` (standing for `dst`) to its flow, starting
    /// one if there is none. Never waits: a datagram its flow has no room for is dropped.
    pub fn datagram(
        &self,
        client: SocketAddrV4,
        alias: SocketAddrV4,
        dst: SocketAddr,
        data: &[u8],
    ) {
        let t = &*self.0;
        let now = t.millis();
        let key = (client, alias);
        let mut flows = t.flows.lock().expect("udp flows lock");
        if let Some(e) = flows.get(&key) {
            if e.tx.is_closed() {
                // Its task has ended (idle, or the stream failed): a new flow replaces it.
                flows.remove(&key);
            } else {
                e.state.last.store(now, Ordering::Relaxed);
                let queued = e.state.queued.load(Ordering::Relaxed);
                if e.tx.capacity() == 0 || queued + data.len() > t.limits.queue_bytes {
                    self.drop_datagram(&e.state, dst);
                    return;
                }
                e.state.queued.fetch_add(data.len(), Ordering::Relaxed);
                if e.tx.try_send(Bytes::copy_from_slice(data)).is_err() {
                    e.state.queued.fetch_sub(data.len(), Ordering::Relaxed);
                    self.drop_datagram(&e.state, dst);
                }
                return;
            }
        }
        if flows.len() >= t.limits.max_flows {
            // Dropping the sender ends the flow once its task has sent what it queued.
            if let Some(oldest) = flows
                .iter()
                .min_by_key(|(_, e)| e.state.last.load(Ordering::Relaxed))
                .map(|(k, _)| *k)
            {
                flows.remove(&oldest);
                tracing::debug!(client = %oldest.0, alias = %oldest.1, max = t.limits.max_flows, "udp flow table full; ending the flow idle longest");
            }
        }
        let (tx, rx) = mpsc::channel(t.limits.queue_len.max(1));
        let state = Arc::new(FlowState::default());
        state.last.store(now, Ordering::Relaxed);
        if data.len() <= t.limits.queue_bytes {
            state.queued.store(data.len(), Ordering::Relaxed);
            let _ = tx.try_send(Bytes::copy_from_slice(data));
        }
        flows.insert(
            key,
            Entry {
                tx,
                state: state.clone(),
            },
        );
        drop(flows);
        let me = self.clone();
        tokio::spawn(
            async move {
                if let Err(e) = me.flow(rx, &state, client, alias, dst).await {
                    tracing::debug!(error = %e, "udp flow failed");
                }
                let dropped = state.dropped.load(Ordering::Relaxed);
                if dropped > 0 {
                    tracing::debug!(dropped, "udp flow ended; datagrams dropped on a full queue");
                }
                let mut flows = me.0.flows.lock().expect("udp flows lock");
                // Only this flow's own entry: a new flow may have taken the key already.
                if flows
                    .get(&key)
                    .is_some_and(|e| Arc::ptr_eq(&e.state, &state))
                {
                    flows.remove(&key);
                }
            }
            .instrument(tracing::debug_span!("udp", %dst, %client)),
        );
    }

    /// Flows open now.
    pub fn len(&self) -> usize {
        self.0.flows.lock().expect("udp flows lock").len()
    }

    /// Whether no flow is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Datagrams dropped so far because their flow's queue was full.
    pub fn dropped(&self) -> u64 {
        self.0.dropped.load(Ordering::Relaxed)
    }

    fn drop_datagram(&self, state: &FlowState, dst: SocketAddr) {
        self.0.dropped.fetch_add(1, Ordering::Relaxed);
        if state.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::debug!(%dst, "udp flow queue full; dropping datagrams, as a full socket buffer would");
        }
    }

    /// One flow: a socket bound to the alias for the replies, a stream opened with the first
    /// datagram, then datagrams both ways until the flow is idle, the stream ends or the table
    /// ends the flow.
    async fn flow(
        &self,
        mut rx: mpsc::Receiver<Bytes>,
        state: &FlowState,
        client: SocketAddrV4,
        alias: SocketAddrV4,
        dst: SocketAddr,
    ) -> Result<(), TunnelError> {
        let t = &*self.0;
        let reply = t.replies.get(alias)?;
        let mut stream = t.streams.open().await?;
        write_frame(&mut stream, &Frame::Open(Open::Udp(dst))).await?;
        let (mut sr, mut sw) = tokio::io::split(stream);
        let up = async {
            while let Some(d) = rx.recv().await {
                state.queued.fetch_sub(d.len(), Ordering::Relaxed);
                write_data(&mut sw, &d).await?;
            }
            Ok::<_, TunnelError>(())
        };
        let down = async {
            tunnel::expect_ok(&mut sr).await?;
            while let Some(d) = read_data(&mut sr).await? {
                state.last.store(t.millis(), Ordering::Relaxed);
                reply.send_to(&d, client).await?;
            }
            Ok(())
        };
        let idle = async {
            loop {
                let last = Duration::from_millis(state.last.load(Ordering::Relaxed));
                let deadline = t.epoch + last + t.limits.idle;
                if Instant::now() >= deadline {
                    return Ok(());
                }
                tokio::time::sleep_until(deadline).await;
            }
        };
        tokio::select! {
            r = up => r,
            r = down => r,
            r = idle => r,
        }
    }
}

impl<S> Table<S> {
    fn millis(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// Sockets bound to aliases, to send replies from: one per alias:port, shared by its flows and
/// closed when the last of them ends.
#[derive(Clone, Default)]
struct ReplySockets(Arc<Mutex<HashMap<SocketAddrV4, Weak<UdpSocket>>>>);

impl ReplySockets {
    fn get(&self, alias: SocketAddrV4) -> io::Result<ReplySocket> {
        let mut map = self.0.lock().expect("reply sockets lock");
        if let Some(s) = map.get(&alias).and_then(Weak::upgrade) {
            return Ok(ReplySocket {
                sock: Some(s),
                alias,
                owner: self.clone(),
            });
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
        map.insert(alias, Arc::downgrade(&s));
        Ok(ReplySocket {
            sock: Some(s),
            alias,
            owner: self.clone(),
        })
    }
}

/// A flow's share of a reply socket.
struct ReplySocket {
    sock: Option<Arc<UdpSocket>>,
    alias: SocketAddrV4,
    owner: ReplySockets,
}

impl std::ops::Deref for ReplySocket {
    type Target = UdpSocket;
    fn deref(&self) -> &UdpSocket {
        self.sock.as_ref().expect("a reply socket until dropped")
    }
}

impl Drop for ReplySocket {
    fn drop(&mut self) {
        // The last share closes the socket; its entry goes with it.
        drop(self.sock.take());
        let mut map = self.owner.0.lock().expect("reply sockets lock");
        if map.get(&self.alias).is_some_and(|w| w.strong_count() == 0) {
            map.remove(&self.alias);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::atomic::AtomicUsize;

    use kt_common::tunnel::{Mode, Mux, MuxStream, read_frame};
    use kt_common::wire::MAX_CONTROL_FRAME;

    use super::*;

    impl Streams for Mux {
        fn open(&self) -> impl Future<Output = Result<MuxStream, TunnelError>> + Send {
            Mux::open(self)
        }
    }

    /// A shadow behind an in-memory multiplexer: counts the Open frames it gets, accepts each
    /// UDP open and hands the stream to `serve`. Returns the client's end.
    fn fake_shadow<F, Fut>(serve: F) -> (Mux, Arc<AtomicUsize>)
    where
        F: Fn(MuxStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let (client, _) = Mux::start(ours, Mode::Client);
        let (server, mut inbound) = Mux::start(theirs, Mode::Server);
        let opens = Arc::new(AtomicUsize::new(0));
        let counted = opens.clone();
        let serve = Arc::new(serve);
        tokio::spawn(async move {
            let _server = server;
            while let Some(mut s) = inbound.recv().await {
                let (counted, serve) = (counted.clone(), serve.clone());
                tokio::spawn(async move {
                    match read_frame(&mut s, MAX_CONTROL_FRAME).await {
                        Ok(Frame::Open(Open::Udp(_))) => {
                            counted.fetch_add(1, Ordering::SeqCst);
                            write_frame(&mut s, &Frame::Reply(None))
                                .await
                                .expect("the shadow's reply");
                            serve(s).await;
                        }
                        other => panic!("the shadow expected a UDP open, got {other:?}"),
                    }
                });
            }
        });
        (client, opens)
    }

    fn v4(s: &str) -> SocketAddrV4 {
        s.parse().expect("an IPv4 socket address")
    }

    #[tokio::test]
    async fn a_burst_on_one_flow_opens_one_stream_and_keeps_its_order() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let seen = got.clone();
        // The far side reads slowly: the flow's queue fills while its stream opens and drains.
        let (mux, opens) = fake_shadow(move |mut s| {
            let seen = seen.clone();
            async move {
                while let Ok(Some(d)) = read_data(&mut s).await {
                    seen.lock().unwrap().push(u32::from_be_bytes(
                        d[..4].try_into().expect("a numbered datagram"),
                    ));
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        });
        let flows = Flows::new(mux, Limits::default());
        let (client, alias) = (v4("127.0.0.1:40000"), v4("127.77.0.1:5353"));
        let dst: SocketAddr = "10.96.0.10:53".parse().unwrap();
        let mut payload = [0u8; 512];
        for i in 0..1_000u32 {
            payload[..4].copy_from_slice(&i.to_be_bytes());
            flows.datagram(client, alias, dst, &payload);
            if i % 50 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let dropped = flows.dropped();
        let delivered = 1_000 - dropped as usize;
        tokio::time::timeout(Duration::from_secs(20), async {
            while got.lock().unwrap().len() < delivered {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{} of {delivered} queued datagrams arrived",
                got.lock().unwrap().len()
            )
        });
        assert_eq!(
            opens.load(Ordering::SeqCst),
            1,
            "one flow must be one stream"
        );
        assert_eq!(flows.len(), 1);
        let got = got.lock().unwrap().clone();
        assert_eq!(got.len(), delivered);
        assert_eq!(got[0], 0, "the first datagram opens the flow");
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "datagrams reordered: {got:?}"
        );
        // The stream's window takes about half the burst, the queue a quarter; the rest is
        // dropped rather than queued without end.
        assert!(
            dropped > 0,
            "the queue must be bounded: all {delivered} datagrams were queued"
        );
    }

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd")
            .expect("/proc/self/fd")
            .count()
    }

    #[tokio::test]
    async fn a_sweep_over_two_thousand_ports_leaves_no_sockets_behind() {
        // The shadow answers each datagram once, so that every flow sends from its alias.
        let (mux, opens) = fake_shadow(|mut s| async move {
            while let Ok(Some(d)) = read_data(&mut s).await {
                if write_data(&mut s, &d).await.is_err() {
                    break;
                }
            }
        });
        let limits = Limits {
            idle: Duration::from_millis(200),
            max_flows: 300,
            ..Limits::default()
        };
        let flows = Flows::new(mux, limits);
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("client socket");
        let SocketAddr::V4(client_addr) = client.local_addr().unwrap() else {
            unreachable!()
        };
        let before = open_fds();
        let mut most = 0;
        for port in 0..2_000u16 {
            let alias = SocketAddrV4::new(Ipv4Addr::new(127, 77, 0, 1), 20_000 + port);
            let dst = SocketAddr::from(([10, 96, 0, 1], 20_000 + port));
            flows.datagram(client_addr, alias, dst, b"probe");
            if port % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
                most = most.max(open_fds());
            }
        }
        assert!(
            flows.len() <= limits.max_flows,
            "{} flows open, over the limit of {}",
            flows.len(),
            limits.max_flows
        );
        // Everything goes idle and is closed.
        let mut after = open_fds();
        for _ in 0..100 {
            if flows.is_empty() && after <= before + 16 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            after = open_fds();
        }
        assert!(opens.load(Ordering::SeqCst) >= 2_000);
        assert!(flows.is_empty(), "{} flows left", flows.len());
        assert!(
            after <= before + 16,
            "{} files open before the sweep, {after} after",
            before
        );
        assert!(
            most <= before + limits.max_flows + 64,
            "{most} files open during the sweep (flows bounded at {})",
            limits.max_flows
        );
    }
}
