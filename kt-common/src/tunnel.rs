//! The tunnel session both ends run: TLS 1.3 with mutual authentication (rustls, ring), yamux
//! multiplexing with per-stream flow control, the versioned handshake and keepalive.
//!
//! Either end may open streams: ktctl opens [`Open::Tcp`]/[`Open::Udp`]/[`Open::Dns`] toward
//! the cluster; the agent opens [`Open::Inbound`] for connections accepted on exposed ports.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::string::{String, ToString};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};
use std::vec::Vec;
use std::{format, vec};

use bytes::{Bytes, BytesMut};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
use tokio_util::sync::CancellationToken;

use crate::wire::{
    self, Frame, MAX_CONTROL_FRAME, MAX_FRAME, MIN_PROTOCOL_VERSION, Open, PROTOCOL_VERSION,
    WireError,
};

/// The name in the agent's certificate that the client checks.
pub const SERVER_NAME: &str = "shadow.ktctl.invalid";
/// How long an opener waits for the first frame of a stream.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// Most streams open at once on one connection.
pub const MAX_STREAMS: usize = 8_192;
/// Window credit shared by all streams beyond yamux's 256 KiB each: bounds how far busy
/// streams' windows auto-tune, so bulk transfers cannot fill the buffers below the multiplexer
/// (queues, the port-forward, sockets) that small requests must pass through.
pub const WINDOW_GROWTH: usize = 1 << 20;

/// A multiplexed stream, as a tokio byte stream.
pub type MuxStream = Compat<yamux::Stream>;

/// Errors of the tunnel layer.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// Transport failure.
    #[error("tunnel i/o: {0}")]
    Io(#[from] io::Error),
    /// A malformed frame.
    #[error("bad frame: {0}")]
    Wire(#[from] WireError),
    /// The multiplexer failed or closed.
    #[error("tunnel closed: {0}")]
    Closed(String),
    /// TLS setup failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// The peer broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The agent refused the session.
    #[error("the agent refused the session: {0}")]
    Rejected(String),
    /// The peer did not answer in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}

/// Result of this module.
pub type Result<T, E = TunnelError> = std::result::Result<T, E>;

// ---------------------------------------------------------------------------------------------
// Frames on a stream

/// Reads exactly one frame (never more bytes than the frame has, so a stream can switch to
/// raw bytes right after it).
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Frame> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix).await?;
    let len = wire::frame_len(prefix, max)?;
    let mut body = BytesMut::zeroed(len);
    r.read_exact(&mut body).await?;
    Ok(Frame::decode(body.freeze())?)
}

/// Like [`read_frame`] with [`FRAME_TIMEOUT`].
pub async fn read_frame_timeout<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    what: &'static str,
) -> Result<Frame> {
    tokio::time::timeout(FRAME_TIMEOUT, read_frame(r, max))
        .await
        .map_err(|_| TunnelError::Timeout(what))?
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> Result<()> {
    w.write_all(&f.encode()).await?;
    w.flush().await?;
    Ok(())
}

/// Writes a datagram as a [`Frame::Data`] without copying the payload twice.
pub async fn write_data<W: AsyncWrite + Unpin>(w: &mut W, payload: &[u8]) -> Result<()> {
    let len = (payload.len() + 1) as u32;
    let mut head = [0u8; 5];
    head[..4].copy_from_slice(&len.to_be_bytes());
    head[4] = wire::DATA_TAG;
    w.write_all(&head).await?;
    w.write_all(payload).await?;
    w.flush().await?;
    Ok(())
}

/// Reads a [`Frame::Data`]; `Ok(None)` at a clean end of stream.
pub async fn read_data<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Bytes>> {
    match read_frame(r, MAX_FRAME).await {
        Ok(Frame::Data(d)) => Ok(Some(d)),
        Ok(other) => Err(TunnelError::Protocol(format!(
            "expected a data frame, got {other:?}"
        ))),
        Err(TunnelError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// Copies `r` to `w` until EOF, then shuts `w` down; returns the bytes copied.
///
/// The buffer is zeroed once and reused. Multiplexed streams are futures-io readers, which
/// need initialised memory: tokio's `read_buf` and `copy` would zero the whole spare capacity
/// on every read, which at thousands of short connections a second shows up in profiles. It
/// starts small (most connections are short) and doubles while reads fill it, up to `cap`.
pub async fn pump<R, W>(r: &mut R, w: &mut W, cap: usize) -> io::Result<u64>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut buf = vec![0u8; cap.clamp(1, PUMP_START)];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
        total += n as u64;
        if n == buf.len() && buf.len() < cap {
            buf.resize((buf.len() * 2).min(cap), 0);
        }
    }
    w.shutdown().await?;
    Ok(total)
}

/// [`pump`]'s first buffer.
const PUMP_START: usize = 4096;

/// Copies both ways between two streams until both directions end (each side's EOF is passed
/// on as a shutdown); returns when the last direction finishes.
pub async fn splice<A, B>(a: A, b: B, cap: usize)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let _ = tokio::join!(pump(&mut ar, &mut bw, cap), pump(&mut br, &mut aw, cap));
}

/// Copies both ways between `conn` and a stream whose open was sent without waiting for its
/// reply (no round trip before the caller's first bytes leave): the caller's bytes go out at
/// once, the other end's only after its reply says the open succeeded. An error: the open
/// was refused or its reply never came, and nothing of the other end reached `conn`.
pub async fn splice_opened(conn: &mut tokio::net::TcpStream, stream: MuxStream) -> Result<()> {
    let (mut cr, mut cw) = conn.split();
    let (mut sr, mut sw) = tokio::io::split(stream);
    let up = async {
        let _ = pump(&mut cr, &mut sw, 16 * 1024).await;
    };
    let down = async {
        expect_ok(&mut sr).await?;
        let _ = pump(&mut sr, &mut cw, 64 * 1024).await;
        Ok(())
    };
    tokio::pin!(up);
    tokio::pin!(down);
    // A refusal stops at once instead of waiting for the caller's side to finish.
    tokio::select! {
        r = &mut down => {
            if r.is_ok() {
                up.await;
            }
            r
        }
        () = &mut up => down.await,
    }
}

// ---------------------------------------------------------------------------------------------
// Multiplexer

/// Which end of the connection: the client (ktctl) opens odd stream ids, the server even ones.
pub use yamux::Mode;

type OpenRequest = oneshot::Sender<Result<yamux::Stream, yamux::ConnectionError>>;

/// A handle on one yamux connection: opens streams; cheap to clone.
#[derive(Clone, Debug)]
pub struct Mux {
    open_tx: mpsc::Sender<OpenRequest>,
    closed: CancellationToken,
}

/// Makes the C allocator keep freed heap memory for the next allocations instead of handing
/// it back to the kernel. A stream's writes become frames that yamux copies into fresh
/// allocations of up to 64 KiB, freed once the transport has sent them: under bulk load the
/// heap grows and shrinks by a window's worth of frames all the time, and with glibc's
/// defaults (give back a free top of more than 128 KiB) every regrowth faulted in and zeroed
/// new pages. The benchmark's profile of the shadow showed a fifth of its CPU time in those
/// page faults. The heap still shrinks past 32 MiB free; allocations of 4 MiB and more keep
/// their own mappings. Call it first in `main`, before other threads start.
pub fn keep_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt changes glibc's allocator settings; it is called before other threads
    // allocate, and both values are in range.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}

/// The yamux settings: many streams, each with its own 256 KiB window (per-stream flow
/// control: a stream whose reader stalls stops its sender), and a small shared budget for
/// windows to grow into.
///
/// What a peer can make this end buffer is bounded by the windows: yamux refuses data beyond a
/// stream's window, so at most [`MAX_STREAMS`] × 256 KiB + [`WINDOW_GROWTH`] wait in streams
/// whose readers stall. (yamux requires the 256 KiB each stream starts with; a lower bound
/// would take fewer streams.) What this end sends is bounded by [`MAX_OUTBOX`].
pub fn yamux_config() -> yamux::Config {
    let mut c = yamux::Config::default();
    c.set_max_connection_receive_window(Some(
        MAX_STREAMS * yamux::DEFAULT_CREDIT as usize + WINDOW_GROWTH,
    ));
    c.set_max_num_streams(MAX_STREAMS);
    c.set_split_send_size(64 * 1024);
    c
}

impl Mux {
    /// Starts the connection's driver task; inbound streams (opened by the peer) arrive on the
    /// returned receiver. The driver ends when the transport does or [`Mux::close`] is called.
    pub fn start<T>(io: T, mode: yamux::Mode) -> (Mux, mpsc::Receiver<MuxStream>)
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mux, inbound, _) = Mux::start_with(io, mode, MAX_OUTBOX);
        (mux, inbound)
    }

    /// [`Mux::start`] with the outbox's limit given; also returns the outbox (for tests).
    fn start_with<T>(
        io: T,
        mode: yamux::Mode,
        max_outbox: usize,
    ) -> (Mux, mpsc::Receiver<MuxStream>, Arc<Mutex<Outbox>>)
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (io, flusher) = transport(io, max_outbox);
        let outbox = flusher.outbox.clone();
        let conn = yamux::Connection::new(io.compat(), yamux_config(), mode);
        let (open_tx, open_rx) = mpsc::channel(256);
        let (in_tx, in_rx) = mpsc::channel(1024);
        let closed = CancellationToken::new();
        let token = closed.clone();
        tokio::spawn(async move {
            let r = drive(conn, flusher, open_rx, in_tx, token.clone()).await;
            if let Err(e) = r {
                tracing::debug!(error = %e, "tunnel connection ended");
            }
            token.cancel();
        });
        (Mux { open_tx, closed }, in_rx, outbox)
    }

    /// Opens a stream to the peer.
    pub async fn open(&self) -> Result<MuxStream> {
        let (tx, rx) = oneshot::channel();
        self.open_tx
            .send(tx)
            .await
            .map_err(|_| TunnelError::Closed("connection gone".into()))?;
        let s = rx
            .await
            .map_err(|_| TunnelError::Closed("connection gone".into()))?
            .map_err(|e| TunnelError::Closed(e.to_string()))?;
        Ok(s.compat())
    }

    /// Opens a stream, sends `open` and waits for the agent's reply.
    pub async fn request(&self, open: Open) -> Result<MuxStream> {
        let mut s = self.open().await?;
        write_frame(&mut s, &Frame::Open(open)).await?;
        expect_ok(&mut s).await?;
        Ok(s)
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Resolves when the connection has ended.
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }

    /// Ends the connection (streams in flight fail).
    pub fn close(&self) {
        self.closed.cancel()
    }
}

/// Reads an open's reply; an error reply becomes [`TunnelError::Rejected`]-like I/O error.
pub async fn expect_ok<S: AsyncRead + Unpin>(s: &mut S) -> Result<()> {
    match read_frame_timeout(s, MAX_CONTROL_FRAME, "the agent's reply").await? {
        Frame::Reply(None) => Ok(()),
        Frame::Reply(Some((code, msg))) => {
            Err(TunnelError::Io(io::Error::new(reply_kind(code), msg)))
        }
        other => Err(TunnelError::Protocol(format!(
            "expected a reply, got {other:?}"
        ))),
    }
}

/// The I/O error kind a failed open stands for.
pub fn reply_kind(code: wire::ErrorCode) -> io::ErrorKind {
    use wire::ErrorCode::*;
    match code {
        Refused => io::ErrorKind::ConnectionRefused,
        Unreachable => io::ErrorKind::HostUnreachable,
        TimedOut => io::ErrorKind::TimedOut,
        Denied => io::ErrorKind::PermissionDenied,
        Unsupported | BadRequest => io::ErrorKind::Unsupported,
        Internal => io::ErrorKind::Other,
    }
}

/// The transport as yamux sees it: reads come straight from the socket; writes are appended to
/// an outbox and never refused. The connection's driver task writes the outbox to the socket
/// after each of its turns ([`Flusher`]), so the frames of one turn (yamux writes each frame's
/// 12-byte header and its body separately) leave together, in full TLS records and few system
/// calls, with no task or channel in between.
///
/// Why writes never wait: yamux stops reading while a frame it owes the peer (a Pong) cannot
/// be written; when both ends' socket buffers are full of data, both would stop reading and
/// wait for each other forever. With writes that never block, reading never stops. yamux
/// sends stream data only within the windows the peer grants as it reads, which keeps the
/// outbox small while the peer reads (6 MiB at most with 200 saturated echo streams on
/// loopback). A peer that stops reading grants nothing more, but every stream opened toward
/// it starts with 256 KiB of credit, so opening streams could queue without end: past
/// [`MAX_OUTBOX`] a write fails instead, which ends the connection (its streams are reset).
struct Transport<T> {
    rd: tokio::io::ReadHalf<T>,
    outbox: Arc<Mutex<Outbox>>,
}

/// Bytes yamux wrote and the socket has not taken yet, in chunks of [`CHUNK`]: memory follows
/// the data (no buffer doubling as it grows), and drained chunks are reused.
struct Outbox {
    chunks: std::collections::VecDeque<BytesMut>,
    spare: Vec<BytesMut>,
    len: usize,
    /// yamux closed its side: shut the socket down once the outbox is written.
    shutdown: bool,
    /// Most bytes held; a write past it fails.
    limit: usize,
    /// A write went past the limit: every write fails from then on.
    overflowed: bool,
}

/// The outbox's chunk size.
const CHUNK: usize = 64 * 1024;
/// Drained chunks kept for reuse.
const SPARE_CHUNKS: usize = 8;
/// Most bytes waiting to be sent to the peer before the connection is ended: the full initial
/// windows of 256 streams (yamux opens at most 256 that the peer has not acknowledged), ten
/// times the most measured with a reading peer (see [`Transport`]).
pub const MAX_OUTBOX: usize = 64 << 20;

impl Outbox {
    fn new(limit: usize) -> Outbox {
        Outbox {
            chunks: Default::default(),
            spare: Vec::new(),
            len: 0,
            shutdown: false,
            limit,
            overflowed: false,
        }
    }

    fn push(&mut self, mut buf: &[u8]) {
        self.len += buf.len();
        while !buf.is_empty() {
            let room = self.chunks.back().map_or(0, |c| c.capacity() - c.len());
            if room == 0 {
                let chunk = self
                    .spare
                    .pop()
                    .unwrap_or_else(|| BytesMut::with_capacity(CHUNK));
                self.chunks.push_back(chunk);
                continue;
            }
            let n = room.min(buf.len());
            let last = self.chunks.back_mut().expect("a chunk with room");
            last.extend_from_slice(&buf[..n]);
            buf = &buf[n..];
        }
    }

    /// The socket took `n` bytes of the first chunk.
    fn consumed(&mut self, n: usize) {
        self.len -= n;
        let first = self.chunks.front_mut().expect("a chunk was written");
        bytes::Buf::advance(first, n);
        if first.is_empty() {
            let mut chunk = self.chunks.pop_front().expect("the first chunk");
            if self.spare.len() < SPARE_CHUNKS {
                chunk.clear();
                // `clear` after `advance` leaves the front of the allocation unused; ask
                // for it back (free when nothing else refers to the allocation).
                chunk.reserve(CHUNK);
                self.spare.push(chunk);
            }
        }
    }
}

/// The write half of the transport, driven by the connection's driver task.
struct Flusher<T> {
    wr: tokio::io::WriteHalf<T>,
    outbox: Arc<Mutex<Outbox>>,
    unflushed: bool,
    shut: bool,
}

fn transport<T: AsyncRead + AsyncWrite>(io: T, max_outbox: usize) -> (Transport<T>, Flusher<T>) {
    let (rd, wr) = tokio::io::split(io);
    let outbox = Arc::new(Mutex::new(Outbox::new(max_outbox)));
    (
        Transport {
            rd,
            outbox: outbox.clone(),
        },
        Flusher {
            wr,
            outbox,
            unflushed: false,
            shut: false,
        },
    )
}

/// Outbox size at which the driver writes before its turn ends.
const FLUSH_AT: usize = 256 * 1024;

impl<T: AsyncRead + AsyncWrite> Flusher<T> {
    /// Bytes waiting in the outbox.
    fn backlog(&self) -> usize {
        self.outbox.lock().expect("outbox lock").len
    }

    /// Whether a write went past the outbox's limit.
    fn overflowed(&self) -> bool {
        self.outbox.lock().expect("outbox lock").overflowed
    }

    /// Writes everything in the outbox; `Pending` (with the waker registered) while the socket
    /// is full. (The lock is uncontended: the transport is written only by yamux, in this same
    /// task.)
    fn poll_send(&mut self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        let mut out = self.outbox.lock().expect("outbox lock");
        while let Some(first) = out.chunks.front().filter(|c| !c.is_empty()) {
            let n = std::task::ready!(std::pin::Pin::new(&mut self.wr).poll_write(cx, first))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            out.consumed(n);
            self.unflushed = true;
        }
        let shutdown = out.shutdown;
        drop(out);
        if self.unflushed {
            std::task::ready!(std::pin::Pin::new(&mut self.wr).poll_flush(cx))?;
            self.unflushed = false;
        }
        if shutdown && !self.shut {
            std::task::ready!(std::pin::Pin::new(&mut self.wr).poll_shutdown(cx))?;
            self.shut = true;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead> AsyncRead for Transport<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.rd).poll_read(cx, buf)
    }
}

impl<T> AsyncWrite for Transport<T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut out = self.outbox.lock().expect("outbox lock");
        if out.shutdown {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "tunnel writer closed",
            )));
        }
        if out.overflowed || out.len + buf.len() > out.limit {
            if !out.overflowed {
                out.overflowed = true;
                tracing::warn!(
                    queued = out.len,
                    limit = out.limit,
                    "the tunnel's peer stopped reading: {} MiB wait to be sent to it; ending the connection",
                    out.len >> 20
                );
            }
            return Poll::Ready(Err(io::Error::other(format!(
                "the peer stopped reading (over {} MiB queued toward it)",
                out.limit >> 20
            ))));
        }
        out.push(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> Poll<io::Result<()>> {
        self.outbox.lock().expect("outbox lock").shutdown = true;
        Poll::Ready(Ok(()))
    }
}

async fn drive<T, W>(
    mut conn: yamux::Connection<T>,
    mut flusher: Flusher<W>,
    mut open_rx: mpsc::Receiver<OpenRequest>,
    in_tx: mpsc::Sender<MuxStream>,
    token: CancellationToken,
) -> Result<(), yamux::ConnectionError>
where
    T: futures::AsyncRead + futures::AsyncWrite + Unpin,
    W: AsyncRead + AsyncWrite,
{
    let mut pending: Option<OpenRequest> = None;
    let mut requests_done = false;
    let cancelled = token.cancelled();
    tokio::pin!(cancelled);
    let result = poll_fn(|cx| {
        loop {
            if cancelled.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            // A long turn (a burst of frames) sends as it goes rather than all at its end.
            if flusher.backlog() >= FLUSH_AT
                && let Poll::Ready(Err(e)) = flusher.poll_send(cx)
            {
                return Poll::Ready(Err(yamux::ConnectionError::Io(e)));
            }
            if pending.is_none() && !requests_done {
                match open_rx.poll_recv(cx) {
                    Poll::Ready(Some(req)) => pending = Some(req),
                    Poll::Ready(None) => requests_done = true,
                    Poll::Pending => {}
                }
            }
            if let Some(req) = pending.take() {
                match conn.poll_new_outbound(cx) {
                    Poll::Ready(res) => {
                        let _ = req.send(res);
                        continue;
                    }
                    Poll::Pending => pending = Some(req),
                }
            }
            match conn.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(s))) => {
                    // A full queue means nobody serves inbound streams fast enough: refuse
                    // this one (dropping it resets it) rather than stall the connection.
                    if in_tx.try_send(s.compat()).is_err() {
                        tracing::warn!("inbound stream queue full; resetting a stream");
                    }
                    continue;
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                // The turn is over: what yamux wrote during it goes out now, together.
                Poll::Pending => {
                    return match flusher.poll_send(cx) {
                        Poll::Ready(Err(e)) => Poll::Ready(Err(yamux::ConnectionError::Io(e))),
                        _ => Poll::Pending,
                    };
                }
            }
        }
    })
    .await;
    if let Some(req) = pending {
        let _ = req.send(Err(yamux::ConnectionError::Closed));
    }
    // Let queued frames (FIN, GoAway) reach the peer when we close on purpose (not when the
    // peer stopped reading: the memory goes at once).
    let mut closed = false;
    let close = poll_fn(|cx| {
        if flusher.overflowed() {
            return Poll::Ready(());
        }
        if !closed && conn.poll_close(cx).is_ready() {
            closed = true;
        }
        match flusher.poll_send(cx) {
            Poll::Ready(Err(_)) => Poll::Ready(()),
            Poll::Ready(Ok(())) if closed => Poll::Ready(()),
            _ => Poll::Pending,
        }
    });
    let _ = tokio::time::timeout(Duration::from_secs(1), close).await;
    result
}

// ---------------------------------------------------------------------------------------------
// TLS

/// One end's own credentials (its trust anchors are given separately).
#[derive(Clone)]
pub struct Identity {
    /// PEM of this end's certificate.
    pub cert_pem: String,
    /// PEM of this end's private key.
    pub key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

fn tls_err(e: &dyn std::fmt::Display) -> TunnelError {
    TunnelError::Tls(e.to_string())
}

fn parse(id: &Identity) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut id.cert_pem.as_bytes())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| tls_err(&e))?;
    if chain.is_empty() {
        return Err(TunnelError::Tls(
            "no certificate in the session credentials".into(),
        ));
    }
    let key = rustls_pemfile::private_key(&mut id.key_pem.as_bytes())
        .map_err(|e| tls_err(&e))?
        .ok_or_else(|| TunnelError::Tls("no private key in the session credentials".into()))?;
    Ok((chain, key))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Which agent certificate ktctl accepts. The agent makes its key pair in its own memory
/// (nothing in the cluster stores it), so there is no CA to check it against; instead ktctl
/// trusts the certificate of its first connection to a pod whose UID it has checked, and from
/// then on only that certificate (trust on first use, as SSH does with host keys). A pod that
/// merely has the shadow's name, labels or any Secret of the namespace cannot present it.
#[derive(Clone, Debug, Default)]
pub struct ServerPin(Arc<Mutex<PinState>>);

#[derive(Debug, Default)]
enum PinState {
    /// Refuse every certificate.
    #[default]
    Refuse,
    /// Accept the next certificate and pin it.
    TrustNext,
    /// Accept only this certificate (DER).
    Pinned(Vec<u8>),
}

impl ServerPin {
    /// A pin that trusts the next certificate it sees (the first connection to a new agent).
    pub fn trust_first() -> ServerPin {
        let p = ServerPin::default();
        p.trust_next();
        p
    }

    /// Forgets the pinned certificate and trusts the next one (a new agent pod).
    pub fn trust_next(&self) {
        *self.0.lock().expect("pin lock") = PinState::TrustNext;
    }

    /// Refuses every certificate until [`ServerPin::trust_next`] (the agent was found to be
    /// another pod than the one the session started).
    pub fn refuse_all(&self) {
        *self.0.lock().expect("pin lock") = PinState::Refuse;
    }

    /// The pinned certificate (DER), if any.
    pub fn pinned(&self) -> Option<Vec<u8>> {
        match &*self.0.lock().expect("pin lock") {
            PinState::Pinned(c) => Some(c.clone()),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct PinVerifier {
    pin: ServerPin,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let mut state = self.pin.0.lock().expect("pin lock");
        match &*state {
            PinState::Pinned(c) if c.as_slice() == end_entity.as_ref() => {}
            PinState::TrustNext => *state = PinState::Pinned(end_entity.to_vec()),
            PinState::Pinned(_) => {
                return Err(rustls::Error::General(
                    "the agent's certificate is not the one pinned for this session".into(),
                ));
            }
            PinState::Refuse => {
                return Err(rustls::Error::General(
                    "no agent is trusted for this session".into(),
                ));
            }
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        // The handshake signature proves the agent holds the pinned certificate's key.
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// ktctl's TLS: TLS 1.3, the client certificate, and only the agent certificate `pin` allows.
pub fn client_tls(id: &Identity, pin: &ServerPin) -> Result<tokio_rustls::TlsConnector> {
    let (chain, key) = parse(id)?;
    let provider = provider();
    let verifier = Arc::new(PinVerifier {
        pin: pin.clone(),
        algorithms: provider.signature_verification_algorithms,
    });
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err(&e))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(|e| tls_err(&e))?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

/// The agent's TLS: TLS 1.3 only, its own credentials, and only clients with a certificate of
/// the session CA (`client_ca_pem`, whose key ktctl dropped after signing its one client
/// certificate).
pub fn server_tls(id: &Identity, client_ca_pem: &str) -> Result<tokio_rustls::TlsAcceptor> {
    let (chain, key) = parse(id)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut client_ca_pem.as_bytes()) {
        roots
            .add(c.map_err(|e| tls_err(&e))?)
            .map_err(|e| tls_err(&e))?;
    }
    if roots.is_empty() {
        return Err(TunnelError::Tls(
            "no session CA certificate for the clients".into(),
        ));
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| tls_err(&e))?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| tls_err(&e))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// The server name ktctl checks.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVER_NAME.to_string()).expect("SERVER_NAME is a valid DNS name")
}

// ---------------------------------------------------------------------------------------------
// Sessions

/// What the agent said in its Welcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// Negotiated protocol version.
    pub version: u16,
    /// The agent's self-description.
    pub agent: String,
    /// The shadow pod's IP.
    pub pod_ip: Option<std::net::IpAddr>,
    /// The cluster DNS the agent relays to.
    pub dns: Option<SocketAddr>,
}

/// A client's live session: the multiplexer plus its keepalive task.
#[derive(Clone, Debug)]
pub struct ClientSession {
    /// Opens streams.
    pub mux: Mux,
    /// The agent's Welcome.
    pub welcome: Welcome,
    rtt: Arc<Mutex<Option<Duration>>>,
}

impl ClientSession {
    /// Runs the client side over an established transport (a port-forward stream, a TCP
    /// connection): TLS, yamux, Hello/Welcome, then pings every `interval`; the session is
    /// closed when a pong is `interval * 3` late. Inbound streams go to `inbound`.
    pub async fn connect<T>(
        io: T,
        tls: &tokio_rustls::TlsConnector,
        session: &str,
        client: &str,
        interval: Duration,
    ) -> Result<(ClientSession, mpsc::Receiver<MuxStream>)>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let tls_stream = tokio::time::timeout(FRAME_TIMEOUT, tls.connect(server_name(), io))
            .await
            .map_err(|_| TunnelError::Timeout("the TLS handshake"))?
            .map_err(|e| TunnelError::Tls(e.to_string()))?;
        let (mux, inbound) = Mux::start(tls_stream, yamux::Mode::Client);
        let mut control = mux.open().await?;
        let hello = Frame::Hello {
            version: PROTOCOL_VERSION,
            min_version: MIN_PROTOCOL_VERSION,
            session: session.to_string(),
            client: client.to_string(),
        };
        write_frame(&mut control, &hello).await?;
        // With TLS 1.3 a refused client certificate shows up here, as the first read fails.
        let welcome = match read_frame_timeout(
            &mut control,
            MAX_CONTROL_FRAME,
            "the agent's welcome",
        )
        .await
        {
            Ok(Frame::Welcome {
                version,
                agent,
                pod_ip,
                dns,
            }) => Welcome {
                version,
                agent,
                pod_ip,
                dns,
            },
            Ok(Frame::Reject { reason }) => {
                mux.close();
                return Err(TunnelError::Rejected(reason));
            }
            Ok(other) => {
                mux.close();
                return Err(TunnelError::Protocol(format!(
                    "expected a welcome, got {other:?}"
                )));
            }
            Err(TunnelError::Wire(e)) => {
                mux.close();
                return Err(TunnelError::Protocol(format!(
                    "cannot read the agent's welcome ({e}): its image is probably of another ktctl version (--image)"
                )));
            }
            Err(e) => {
                mux.close();
                return Err(e);
            }
        };
        let rtt = Arc::new(Mutex::new(None));
        tokio::spawn(keepalive(control, mux.clone(), interval, rtt.clone()));
        Ok((ClientSession { mux, welcome, rtt }, inbound))
    }

    /// The latest keepalive round trip.
    pub fn rtt(&self) -> Option<Duration> {
        *self.rtt.lock().expect("rtt lock")
    }
}

async fn keepalive(
    mut control: MuxStream,
    mux: Mux,
    interval: Duration,
    rtt: Arc<Mutex<Option<Duration>>>,
) {
    let mut nonce = 0u64;
    loop {
        tokio::select! {
            _ = mux.closed() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        nonce += 1;
        let sent = Instant::now();
        let exchange = async {
            write_frame(&mut control, &Frame::Ping { nonce }).await?;
            loop {
                match read_frame(&mut control, MAX_CONTROL_FRAME).await? {
                    Frame::Pong { nonce: n } if n == nonce => return Ok::<_, TunnelError>(()),
                    Frame::Pong { .. } => continue,
                    other => {
                        return Err(TunnelError::Protocol(format!(
                            "unexpected {other:?} on the control stream"
                        )));
                    }
                }
            }
        };
        match tokio::time::timeout(interval * 3, exchange).await {
            Ok(Ok(())) => *rtt.lock().expect("rtt lock") = Some(sent.elapsed()),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "tunnel keepalive failed");
                mux.close();
                return;
            }
            Err(_) => {
                tracing::warn!(timeout = ?interval * 3, "tunnel keepalive timed out");
                mux.close();
                return;
            }
        }
    }
}

/// What the agent needs to accept sessions.
#[derive(Clone, Debug)]
pub struct ServerInfo {
    /// Sessions must say this id in their Hello.
    pub session: String,
    /// The agent's self-description.
    pub agent: String,
    /// The pod's IP.
    pub pod_ip: Option<std::net::IpAddr>,
    /// The cluster DNS used for [`Open::Dns`].
    pub dns: Option<SocketAddr>,
    /// A connection whose control stream is silent this long is dropped.
    pub idle: Duration,
}

/// Handles one opened stream on the agent; gets the connection's [`Mux`] to open streams back.
pub type StreamHandler =
    Arc<dyn Fn(Mux, Open, MuxStream) -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// The agent's side of the handshake: TLS, yamux, Hello, Welcome (or Reject). A peer that
/// closes before its TLS ClientHello (a port probe or scan) comes back as [`TunnelError::Io`]
/// with the socket's error kind, so callers can log it quietly.
async fn agent_handshake<T>(
    io: T,
    tls: tokio_rustls::TlsAcceptor,
    info: &ServerInfo,
) -> Result<(Mux, mpsc::Receiver<MuxStream>, MuxStream)>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let tls_stream = tls.accept(io).await.map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => TunnelError::Io(e),
        _ => TunnelError::Tls(e.to_string()),
    })?;
    let (mux, mut inbound) = Mux::start(tls_stream, yamux::Mode::Server);
    // Closes the connection if the caller's timeout drops this future half way.
    let mut guard = CloseOnDrop(Some(mux.clone()));
    let r = async {
        let mut control = inbound
            .recv()
            .await
            .ok_or_else(|| TunnelError::Closed("no control stream".into()))?;
        let hello = read_frame(&mut control, MAX_CONTROL_FRAME).await?;
        let verdict = match hello {
            Frame::Hello {
                version,
                min_version,
                session,
                client,
            } => {
                let v = version.min(PROTOCOL_VERSION);
                if v < min_version.max(MIN_PROTOCOL_VERSION) {
                    Err(format!(
                        "no common protocol version (client {min_version}..={version}, agent {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION})"
                    ))
                } else if session != info.session {
                    Err(format!(
                        "this agent serves session {}, not {session}",
                        info.session
                    ))
                } else {
                    tracing::info!(%client, version = v, "client connected");
                    Ok(v)
                }
            }
            other => Err(format!("expected a hello, got {other:?}")),
        };
        let version = match verdict {
            Ok(v) => v,
            Err(reason) => {
                let _ = write_frame(
                    &mut control,
                    &Frame::Reject {
                        reason: reason.clone(),
                    },
                )
                .await;
                return Err(TunnelError::Rejected(reason));
            }
        };
        let welcome = Frame::Welcome {
            version,
            agent: info.agent.clone(),
            pod_ip: info.pod_ip,
            dns: info.dns,
        };
        write_frame(&mut control, &welcome).await?;
        Ok(control)
    }
    .await;
    match r {
        Ok(control) => {
            guard.0 = None;
            Ok((mux, inbound, control))
        }
        Err(e) => Err(e),
    }
}

struct CloseOnDrop(Option<Mux>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if let Some(m) = &self.0 {
            m.close();
        }
    }
}

/// Serves one accepted transport: TLS (client certificate required), yamux, the handshake on
/// the first stream, then each further stream's Open goes to `handler`. The whole handshake
/// (TLS, the control stream, Hello and Welcome) must finish within [`FRAME_TIMEOUT`];
/// `handshake` (a slot of the caller's bound on handshakes in progress) is released as soon
/// as it has. Returns when the connection ends.
pub async fn serve_connection<T, P>(
    io: T,
    tls: tokio_rustls::TlsAcceptor,
    info: Arc<ServerInfo>,
    handler: StreamHandler,
    handshake: P,
) -> Result<()>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    P: Send,
{
    let (mux, mut inbound, mut control) =
        match tokio::time::timeout(FRAME_TIMEOUT, agent_handshake(io, tls, &info)).await {
            Ok(r) => r?,
            Err(_) => return Err(TunnelError::Timeout("the client's handshake")),
        };
    drop(handshake);
    let ctrl_mux = mux.clone();
    let idle = info.idle;
    tokio::spawn(async move {
        loop {
            match tokio::time::timeout(idle, read_frame(&mut control, MAX_CONTROL_FRAME)).await {
                Ok(Ok(Frame::Ping { nonce })) => {
                    if write_frame(&mut control, &Frame::Pong { nonce })
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                Ok(Ok(other)) => {
                    tracing::warn!(frame = ?other, "unexpected frame on the control stream");
                    break;
                }
                Ok(Err(_)) => break,
                Err(_) => {
                    tracing::warn!(?idle, "client silent; closing its connection");
                    break;
                }
            }
        }
        ctrl_mux.close();
    });
    loop {
        let mut s = tokio::select! {
            s = inbound.recv() => match s { Some(s) => s, None => break },
            _ = mux.closed() => break,
        };
        let handler = handler.clone();
        let mux = mux.clone();
        tokio::spawn(async move {
            match read_frame_timeout(&mut s, MAX_CONTROL_FRAME, "an open").await {
                Ok(Frame::Open(open)) => handler(mux, open, s).await,
                Ok(other) => {
                    let msg = format!("expected an open, got {other:?}");
                    let _ = write_frame(
                        &mut s,
                        &Frame::Reply(Some((wire::ErrorCode::BadRequest, msg))),
                    )
                    .await;
                }
                Err(TunnelError::Wire(e)) => {
                    let _ = write_frame(
                        &mut s,
                        &Frame::Reply(Some((wire::ErrorCode::BadRequest, e.to_string()))),
                    )
                    .await;
                }
                Err(e) => tracing::debug!(error = %e, "stream ended before its open"),
            }
        });
    }
    mux.close();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Handlers both ends can serve

/// Serves [`Open::Echo`], [`Open::Source`] and [`Open::Sink`] (diagnostics); returns the
/// stream back if the open is something else.
pub async fn serve_diagnostic(open: &Open, mut s: MuxStream) -> Option<MuxStream> {
    match open {
        Open::Echo => {
            if write_frame(&mut s, &Frame::Reply(None)).await.is_ok() {
                let (mut r, mut w) = tokio::io::split(s);
                let _ = pump(&mut r, &mut w, 16 * 1024).await;
            }
            None
        }
        Open::Source { bytes } => {
            if write_frame(&mut s, &Frame::Reply(None)).await.is_ok() {
                let chunk = vec![0u8; 64 * 1024];
                let mut left = *bytes;
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    if s.write_all(&chunk[..n]).await.is_err() {
                        return None;
                    }
                    left -= n as u64;
                }
                let _ = s.shutdown().await;
            }
            None
        }
        Open::Sink => {
            if write_frame(&mut s, &Frame::Reply(None)).await.is_ok() {
                let mut buf = vec![0u8; 64 * 1024];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => total += n as u64,
                        Err(_) => return None,
                    }
                }
                let _ = s.write_all(&total.to_be_bytes()).await;
                let _ = s.shutdown().await;
            }
            None
        }
        _ => Some(s),
    }
}

/// Raises this process's soft limit on open descriptors to its hard limit; returns the new
/// limit. Every tunnel stream, proxied connection and UDP flow holds a descriptor, and the
/// usual soft limit (1024) is far below what one busy developer machine or shadow needs.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(lim.rlim_cur)
}

/// Replies to an open this end does not serve.
pub async fn refuse(mut s: MuxStream, code: wire::ErrorCode, msg: &str) {
    let _ = write_frame(&mut s, &Frame::Reply(Some((code, msg.to_string())))).await;
    let _ = s.shutdown().await;
}

#[cfg(test)]
mod pump_tests {
    use super::*;

    #[tokio::test]
    async fn pump_copies_everything_while_its_buffer_grows() {
        let data: Vec<u8> = (0..1_000_003u32).map(|i| (i % 251) as u8).collect();
        let (mut a, mut b) = tokio::io::duplex(256 * 1024);
        let (mut out_w, mut out_r) = tokio::io::duplex(256 * 1024);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            a.write_all(&sent).await.unwrap();
            a.shutdown().await.unwrap();
        });
        let reader = tokio::spawn(async move {
            let mut got = vec![];
            out_r.read_to_end(&mut got).await.unwrap();
            got
        });
        let n = pump(&mut b, &mut out_w, 64 * 1024).await.unwrap();
        writer.await.unwrap();
        assert_eq!(n, data.len() as u64);
        assert_eq!(reader.await.unwrap(), data);
    }
}

#[cfg(test)]
mod transport_tests {
    use super::*;
    use std::pin::Pin;
    use std::task::Context;

    /// What the fake socket saw; shared with the test.
    #[derive(Default)]
    struct Seen {
        writes: Vec<Vec<u8>>,
        full: bool,
        /// The most a write takes (0: all).
        max_write: usize,
        flushes: usize,
        shut: bool,
    }

    /// A socket that records each write it is given and can be made to refuse writes.
    #[derive(Clone, Default)]
    struct Socket(Arc<Mutex<Seen>>);

    impl Socket {
        fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
            self.0.lock().unwrap()
        }
    }

    impl AsyncRead for Socket {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Socket {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let mut seen = self.seen();
            if seen.full {
                return Poll::Pending;
            }
            let n = match seen.max_write {
                0 => buf.len(),
                m => m.min(buf.len()),
            };
            seen.writes.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.seen().flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.seen().shut = true;
            Poll::Ready(Ok(()))
        }
    }

    fn cx() -> Context<'static> {
        Context::from_waker(std::task::Waker::noop())
    }

    fn write(t: &mut Transport<Socket>, bytes: &[u8]) {
        assert!(matches!(
            Pin::new(t).poll_write(&mut cx(), bytes),
            Poll::Ready(Ok(n)) if n == bytes.len()
        ));
    }

    #[test]
    fn the_frames_of_one_turn_leave_in_one_write_and_one_flush() {
        let socket = Socket::default();
        let (mut t, mut f) = transport(socket.clone(), MAX_OUTBOX);
        for part in [&b"header12byte"[..], b"body", b"header12byte", b"more body"] {
            write(&mut t, part);
        }
        assert!(matches!(f.poll_send(&mut cx()), Poll::Ready(Ok(()))));
        let seen = socket.seen();
        assert_eq!(
            seen.writes,
            vec![b"header12bytebodyheader12bytemore body".to_vec()]
        );
        assert_eq!(seen.flushes, 1);
        assert!(!seen.shut);
    }

    #[test]
    fn big_and_partial_writes_keep_their_order_in_a_few_reused_chunks() {
        let socket = Socket::default();
        socket.seen().max_write = 10_000;
        let (mut t, mut f) = transport(socket.clone(), MAX_OUTBOX);
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        for turn in data.chunks(200_000) {
            for piece in turn.chunks(12_345) {
                write(&mut t, piece);
            }
            assert!(matches!(f.poll_send(&mut cx()), Poll::Ready(Ok(()))));
            let out = f.outbox.lock().unwrap();
            assert_eq!(out.len, 0);
            assert!(out.chunks.iter().all(|c| c.is_empty()));
            assert!(out.spare.len() <= SPARE_CHUNKS);
        }
        let seen = socket.seen();
        assert!(seen.writes.iter().all(|w| w.len() <= 10_000));
        assert_eq!(seen.writes.concat(), data);
    }

    #[test]
    fn writes_are_never_refused_while_the_socket_is_full_and_leave_in_order_after() {
        let socket = Socket::default();
        socket.seen().full = true;
        let (mut t, mut f) = transport(socket.clone(), MAX_OUTBOX);
        write(&mut t, b"one ");
        assert!(f.poll_send(&mut cx()).is_pending());
        // yamux goes on writing (a Pong, say) while the socket is full, then closes.
        write(&mut t, b"two ");
        write(&mut t, b"three");
        assert_eq!(f.backlog(), 13);
        assert!(f.poll_send(&mut cx()).is_pending());
        assert!(matches!(
            Pin::new(&mut t).poll_shutdown(&mut cx()),
            Poll::Ready(Ok(()))
        ));
        assert!(matches!(
            Pin::new(&mut t).poll_write(&mut cx(), b"late"),
            Poll::Ready(Err(_))
        ));
        assert!(
            !socket.seen().shut,
            "shut down before the outbox was written"
        );
        // The socket drains: everything leaves, oldest first, then the shutdown.
        socket.seen().full = false;
        assert!(matches!(f.poll_send(&mut cx()), Poll::Ready(Ok(()))));
        let seen = socket.seen();
        assert_eq!(seen.writes.concat(), b"one two three".to_vec());
        assert!(seen.shut);
    }

    #[test]
    fn a_write_past_the_limit_fails_and_so_does_every_later_one() {
        let socket = Socket::default();
        socket.seen().full = true;
        let (mut t, mut f) = transport(socket.clone(), 10);
        write(&mut t, b"0123456789");
        assert!(matches!(
            Pin::new(&mut t).poll_write(&mut cx(), b"x"),
            Poll::Ready(Err(_))
        ));
        assert_eq!(f.backlog(), 10, "the refused write was queued");
        assert!(f.overflowed());
        // Room again does not revive a connection whose peer stopped reading.
        socket.seen().full = false;
        assert!(matches!(f.poll_send(&mut cx()), Poll::Ready(Ok(()))));
        assert!(matches!(
            Pin::new(&mut t).poll_write(&mut cx(), b"x"),
            Poll::Ready(Err(_))
        ));
    }

    /// Regression: toward a peer that stopped reading its socket, every new stream's credit
    /// went into the outbox, which grew without bound.
    #[tokio::test]
    async fn a_peer_that_stops_reading_ends_the_connection_instead_of_growing_the_outbox() {
        let limit = 4 << 20;
        // The peer's end: held open, never read.
        let (ours, _theirs) = tokio::io::duplex(64 * 1024);
        let (mux, _inbound, outbox) = Mux::start_with(ours, Mode::Client, limit);
        // 64 streams with 256 KiB of credit each could queue 16 MiB.
        for _ in 0..64 {
            let mux = mux.clone();
            tokio::spawn(async move {
                let Ok(mut s) = mux.open().await else { return };
                let chunk = vec![7u8; 16 * 1024];
                while s.write_all(&chunk).await.is_ok() {}
            });
        }
        let ended = tokio::time::timeout(Duration::from_secs(10), mux.closed()).await;
        let out = outbox.lock().unwrap();
        assert!(
            ended.is_ok(),
            "the connection is still up with {} KiB queued toward a peer that does not read",
            out.len >> 10
        );
        assert!(out.overflowed, "the connection ended for another reason");
        assert!(out.len <= limit, "{} bytes queued, over the limit", out.len);
    }
}
