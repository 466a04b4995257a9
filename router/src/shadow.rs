//! The shadow role: the cluster end of one developer's tunnel.
//!
//! It makes its own TLS key at start (no Secret holds it), accepts only the session's client
//! certificate, dials only what the session routes ([`DialPolicy`]), and ends the session
//! when ktctl has been gone for longer than the grace period ([`LeaseWatch`]). No peer can make
//! it exit: accept errors (out of descriptors, aborted connections) are logged and backed off,
//! and handshakes in progress are bounded.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::FutureExt;
use k8s_openapi::api::coordination::v1::Lease;
use kt_common::tunnel::{
    self, Mux, MuxStream, ServerInfo, StreamHandler, TunnelError, read_data, write_data,
    write_frame,
};
use kt_common::wire::{ErrorCode, Frame, Open};
use kube::Api;
use kube::api::DeleteParams;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::expose::Exposed;
use crate::policy::DialPolicy;
use crate::restore::{self, Changed};

/// How long a dial to a cluster address may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// A UDP flow with no datagram either way for this long ends.
const UDP_IDLE: Duration = Duration::from_secs(60);
/// How long the cluster's DNS may take to answer over TCP (connect, write, read).
const DNS_TCP_TIMEOUT: Duration = Duration::from_secs(5);
/// Tunnel handshakes in progress at once. A slow or silent peer holds a slot for at most the
/// handshake timeout; past the bound new connections are closed at once (sshd's MaxStartups
/// idea), so idle connections cannot pile up descriptors and memory.
const MAX_HANDSHAKES: usize = 64;
/// Port of the readiness probe's listener: the kubelet's TCP probe connects here, not to the
/// tunnel, so probes neither log nor cost a TLS handshake.
pub const HEALTH_PORT: u16 = 7444;
/// How often the session's Lease is read.
const LEASE_POLL: Duration = Duration::from_secs(2);
/// Longest wait for one read of the Lease: a hung API call must not stall the watch.
const LEASE_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// `kt-router shadow`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address of the tunnel listener
    #[arg(long, default_value = "0.0.0.0:7443")]
    listen: SocketAddr,
    /// Port of the readiness listener (0: none)
    #[arg(long, default_value_t = HEALTH_PORT)]
    health_port: u16,
    /// PEM of the session CA that signed ktctl's client certificate (public)
    #[arg(long, env = "KT_CLIENT_CA", hide_env_values = true)]
    client_ca: String,
    /// The session id clients must present
    #[arg(long)]
    session: String,
    /// The session's anchor Lease (empty: no lease watch)
    #[arg(long, default_value = "")]
    lease: String,
    /// Seconds without a lease renewal after which the session ends
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    grace: u64,
    /// Namespace of the lease
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
    /// The cluster CIDRs this session routes: the only destinations the shadow dials
    #[arg(long, default_value = "")]
    routes: String,
    /// CIDRs cut out of the routes (--excludeIps, the API server)
    #[arg(long, default_value = "")]
    except: String,
    /// Ports to listen on for the whole session, comma separated; connections on them go to
    /// ktctl (exchange, mesh, preview)
    #[arg(long, value_delimiter = ',')]
    expose: Vec<u16>,
    /// Objects the session changed (service/<name>, deployment/<name>), comma separated:
    /// restored when the session ends without ktctl
    #[arg(long, value_delimiter = ',')]
    restore: Vec<Changed>,
}

pub async fn run(args: Args) -> Result<()> {
    let id = kt_common::pki::agent_identity(&args.session, 30).context("making the TLS key")?;
    let tls = tunnel::server_tls(&id, &args.client_ca).context("TLS setup")?;
    let policy =
        Arc::new(DialPolicy::parse(&args.routes, &args.except).map_err(anyhow::Error::msg)?);
    let dns = cluster_dns();
    let pod_ip = std::env::var("POD_IP")
        .ok()
        .and_then(|s| s.parse::<IpAddr>().ok());
    let info = Arc::new(ServerInfo {
        session: args.session.clone(),
        agent: format!("kt-router {}", env!("CARGO_PKG_VERSION")),
        pod_ip,
        dns,
        idle: Duration::from_secs(30),
    });
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let exposed = Arc::new(Exposed::default());
    for port in &args.expose {
        exposed
            .listen(*port)
            .await
            .with_context(|| format!("listening on exposed port {port}"))?;
    }
    let handler: StreamHandler = {
        let policy = policy.clone();
        Arc::new(move |mux, open, s| {
            handle(mux, open, s, dns, policy.clone(), exposed.clone()).boxed()
        })
    };
    // Bound after the tunnel's listener, so that Ready means the tunnel accepts.
    let health = health_listener(args.listen.ip(), args.health_port).await?;
    tracing::info!(listen = %args.listen, session = %args.session, ?dns, routes = %args.routes, except = %args.except, "shadow ready");
    let session_over = async {
        if args.lease.is_empty() {
            return std::future::pending().await;
        }
        watch_lease(
            args.namespace.clone(),
            args.lease.clone(),
            Duration::from_secs(args.grace),
            (args.session.clone(), args.restore.clone()),
        )
        .await
    };
    tokio::select! {
        () = serve(listener, tls, info, handler) => Ok(()),
        () = serve_health(health) => Ok(()),
        r = session_over => r,
    }
}

/// Accepts tunnel connections forever; no accept error ends it.
///
/// Out of descriptors (EMFILE, ENFILE), the pending connections are shed: a reserve
/// descriptor is given up to accept one and close it at once, so that a flood of idle
/// connections does not sit in the backlog in front of the real client (the approach of
/// libev and nginx). Other errors (ENOMEM, ENOBUFS) back off from 10 ms to 1 s; an aborted
/// connection is simply skipped. Each kind is logged at most once a second.
async fn serve(
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    info: Arc<ServerInfo>,
    handler: StreamHandler,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let mut reserve = std::fs::File::open("/dev/null").ok();
    let mut backoff = Backoff::default();
    let mut last_log: Option<Instant> = None;
    let mut shed = 0u64;
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                let out_of_fds = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                if out_of_fds && reserve.take().is_some() {
                    if let Some(Ok((c, _))) = listener.accept().now_or_never() {
                        drop(c);
                        shed += 1;
                    }
                    reserve = std::fs::File::open("/dev/null").ok();
                }
                let wait = match e.raw_os_error() {
                    Some(libc::ECONNABORTED) => Duration::ZERO,
                    _ if out_of_fds && reserve.is_some() => Duration::ZERO,
                    _ => backoff.next(),
                };
                if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    last_log = Some(Instant::now());
                    tracing::warn!(error = %e, shed, retry_in = ?wait, "accept failed; going on");
                }
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                } else {
                    // Let the connections in progress run (and free descriptors).
                    tokio::task::yield_now().await;
                }
                continue;
            }
        };
        backoff.reset();
        let Ok(slot) = handshakes.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "too many handshakes in progress; closing a new connection");
            continue;
        };
        let _ = conn.set_nodelay(true);
        let (tls, info, handler) = (tls.clone(), info.clone(), handler.clone());
        tokio::spawn(
            async move {
                match tunnel::serve_connection(conn, tls, info, handler, slot).await {
                    Ok(()) => tracing::info!("tunnel connection closed"),
                    // Closed before TLS began: a port probe or scan, not worth a line.
                    Err(TunnelError::Io(e)) => {
                        tracing::debug!(error = %e, "connection closed before its handshake")
                    }
                    Err(e) => tracing::warn!(error = %e, "tunnel connection refused or failed"),
                }
            }
            .instrument(tracing::info_span!("conn", %peer)),
        );
    }
}

/// The readiness probe's listener on `port` (0: none). Each role binds it once what the probe
/// stands for works, so that Ready means it.
pub(crate) async fn health_listener(
    ip: std::net::IpAddr,
    port: u16,
) -> Result<Option<TcpListener>> {
    if port == 0 {
        return Ok(None);
    }
    TcpListener::bind((ip, port))
        .await
        .map(Some)
        .with_context(|| format!("listening on port {port} (readiness)"))
}

/// The readiness probe's listener: accepts and closes, silently.
pub(crate) async fn serve_health(listener: Option<TcpListener>) {
    let Some(listener) = listener else {
        return std::future::pending().await;
    };
    let mut backoff = Backoff::default();
    loop {
        match listener.accept().await {
            Ok(_) => backoff.reset(),
            Err(_) => tokio::time::sleep(backoff.next()).await,
        }
    }
}

/// Exponential backoff from 10 ms to 1 s.
#[derive(Default)]
pub(crate) struct Backoff(u32);

impl Backoff {
    pub(crate) fn next(&mut self) -> Duration {
        self.0 = (self.0 + 1).min(8);
        Duration::from_millis(10 << (self.0 - 1)).min(Duration::from_secs(1))
    }
    pub(crate) fn reset(&mut self) {
        self.0 = 0;
    }
}

/// The first nameserver of the pod's resolv.conf: the cluster's DNS.
fn cluster_dns() -> Option<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    text.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next() == Some("nameserver"))
            .then(|| {
                w.next()?
                    .parse::<IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, 53))
            })
            .flatten()
    })
}

/// What one read of the Lease found.
#[derive(Debug)]
pub enum LeaseRead {
    /// The Lease exists with this renew time.
    Renewed(Option<String>),
    /// The Lease is gone: the session ended elsewhere.
    Gone,
    /// The API server did not answer (outage, timeout, error).
    Failed,
}

/// What the watch concludes.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// ktctl may still be there.
    Alive,
    /// The session's Lease is gone.
    Ended,
    /// ktctl has been gone longer than the grace period.
    Expired,
}

/// Decides from successive reads of the Lease whether ktctl is gone, on this pod's monotonic
/// clock only: clock skew between the developer's machine and the cluster does not matter.
///
/// As in Kubernetes' leader election, a holder is judged by how long *we* have seen its
/// record unchanged, never by the timestamps in it. After an API server outage (a failed
/// read) the grace period starts again from the first successful read: ktctl could not renew
/// while the API server was away, so the outage is not evidence that it is gone.
#[derive(Debug)]
pub struct LeaseWatch {
    grace: Duration,
    last_seen: Option<Option<String>>,
    since: Instant,
    after_failure: bool,
}

impl LeaseWatch {
    /// A watch that starts counting at `now`.
    pub fn new(grace: Duration, now: Instant) -> LeaseWatch {
        LeaseWatch {
            grace,
            last_seen: None,
            since: now,
            after_failure: false,
        }
    }

    /// Takes one read made at `now`.
    pub fn observe(&mut self, now: Instant, read: LeaseRead) -> Verdict {
        match read {
            LeaseRead::Gone => Verdict::Ended,
            LeaseRead::Failed => {
                self.after_failure = true;
                Verdict::Alive
            }
            LeaseRead::Renewed(renew) => {
                if self.after_failure || self.last_seen.as_ref() != Some(&renew) {
                    self.after_failure = false;
                    self.last_seen = Some(renew);
                    self.since = now;
                    Verdict::Alive
                } else if now.duration_since(self.since) > self.grace {
                    Verdict::Expired
                } else {
                    Verdict::Alive
                }
            }
        }
    }
}

/// Returns when the session is over: its Lease was deleted, or ktctl was gone for longer than
/// `grace` and this shadow deleted the Lease (garbage collection removes the rest, this pod
/// included). Either way, what the session changed in users' objects is restored first
/// (`changed`: the session id and the objects); when ktctl ended the session itself, it has
/// restored them already and this finds nothing to do.
async fn watch_lease(
    ns: String,
    name: String,
    grace: Duration,
    changed: (String, Vec<Changed>),
) -> Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("no in-cluster API access; the session cannot end by itself")?;
    let api: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let mut watch = LeaseWatch::new(grace, Instant::now());
    let mut failing = false;
    loop {
        tokio::time::sleep(LEASE_POLL).await;
        let read = match tokio::time::timeout(LEASE_READ_TIMEOUT, api.get_opt(&name)).await {
            Ok(Ok(Some(l))) => {
                LeaseRead::Renewed(l.spec.and_then(|s| s.renew_time).map(|t| t.0.to_string()))
            }
            Ok(Ok(None)) => LeaseRead::Gone,
            Ok(Err(e)) => {
                if !failing {
                    tracing::warn!(lease = %name, error = %e, "cannot read the session's lease; the grace period starts again once the API server answers");
                }
                LeaseRead::Failed
            }
            Err(_) => {
                if !failing {
                    tracing::warn!(lease = %name, timeout = ?LEASE_READ_TIMEOUT, "reading the session's lease timed out; the grace period starts again once the API server answers");
                }
                LeaseRead::Failed
            }
        };
        let failed = matches!(read, LeaseRead::Failed);
        if failing && !failed {
            tracing::info!(lease = %name, "the API server answers again");
        }
        failing = failed;
        match watch.observe(Instant::now(), read) {
            Verdict::Alive => {}
            Verdict::Ended => {
                tracing::info!(lease = %name, "session ended (lease deleted); exiting");
                restore::restore(client.clone(), &ns, &changed.0, &changed.1).await;
                return Ok(());
            }
            Verdict::Expired => {
                tracing::warn!(lease = %name, ?grace, "ktctl has been gone longer than the grace period; ending the session");
                restore::restore(client.clone(), &ns, &changed.0, &changed.1).await;
                match api.delete(&name, &DeleteParams::background()).await {
                    Ok(_) => return Ok(()),
                    Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
                    Err(e) => tracing::error!(error = %e, "cannot delete the session's lease"),
                }
            }
        }
    }
}

async fn handle(
    mux: Mux,
    open: Open,
    s: MuxStream,
    dns: Option<SocketAddr>,
    policy: Arc<DialPolicy>,
    exposed: Arc<Exposed>,
) {
    let span = tracing::debug_span!("stream", ?open);
    async move {
        let dst = match open {
            Open::Tcp(dst) | Open::Udp(dst) => Some(dst),
            _ => None,
        };
        if let Some(dst) = dst
            && let Some(why) = policy.check(dst.ip())
        {
            tracing::warn!(%dst, reason = why, "refused a dial outside the session's routes");
            return tunnel::refuse(
                s,
                ErrorCode::Denied,
                &format!("the shadow does not dial {dst}: {why}"),
            )
            .await;
        }
        match open {
            Open::Tcp(dst) => tcp(s, dst).await,
            Open::Udp(dst) => udp(s, dst, UDP_IDLE).await,
            Open::Dns => match dns {
                Some(server) => relay_dns(s, server).await,
                None => {
                    tunnel::refuse(s, ErrorCode::Unsupported, "the shadow has no resolver").await
                }
            },
            Open::Expose { port } => exposed.expose(mux, s, port).await,
            Open::Inbound { .. } => {
                tunnel::refuse(
                    s,
                    ErrorCode::BadRequest,
                    "only the shadow opens inbound streams",
                )
                .await
            }
            other => {
                if let Some(s) = tunnel::serve_diagnostic(&other, s).await {
                    tunnel::refuse(s, ErrorCode::Unsupported, "unknown request").await;
                }
            }
        }
    }
    .instrument(span)
    .await
}

async fn tcp(mut s: MuxStream, dst: SocketAddr) {
    let conn = match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(dst)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(%dst, error = %e, "dial failed");
            return tunnel::refuse(s, ErrorCode::from_io(&e), &format!("{dst}: {e}")).await;
        }
        Err(_) => {
            return tunnel::refuse(
                s,
                ErrorCode::TimedOut,
                &format!("{dst}: no answer in {DIAL_TIMEOUT:?}"),
            )
            .await;
        }
    };
    let _ = conn.set_nodelay(true);
    if write_frame(&mut s, &Frame::Reply(None)).await.is_err() {
        return;
    }
    tunnel::splice(s, conn, 64 * 1024).await;
}

/// One UDP flow: datagrams both ways until neither way has moved for `idle`.
async fn udp(mut s: MuxStream, dst: SocketAddr, idle_after: Duration) {
    let bind: SocketAddr = if dst.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let sock = match UdpSocket::bind(bind).await {
        Ok(x) => x,
        Err(e) => return tunnel::refuse(s, ErrorCode::Internal, &e.to_string()).await,
    };
    if let Err(e) = sock.connect(dst).await {
        return tunnel::refuse(s, ErrorCode::from_io(&e), &format!("{dst}: {e}")).await;
    }
    if write_frame(&mut s, &Frame::Reply(None)).await.is_err() {
        return;
    }
    let (mut r, mut w) = tokio::io::split(s);
    let mut buf = vec![0u8; 65_536];
    // A datagram either way keeps the flow: a client that only listens (a stream of replies
    // to one request, as in syslog or media) must not lose its flow.
    let start = Instant::now();
    let last = std::sync::atomic::AtomicU64::new(0);
    let touch = || {
        last.store(
            start.elapsed().as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        )
    };
    let up = async {
        while let Ok(Some(d)) = read_data(&mut r).await {
            touch();
            if sock.send(&d).await.is_err() {
                break;
            }
        }
    };
    let down = async {
        loop {
            match sock.recv(&mut buf).await {
                Ok(n) => {
                    touch();
                    if write_data(&mut w, &buf[..n]).await.is_err() {
                        break;
                    }
                }
                // ICMP port unreachable and friends: keep the flow, as a socket would.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                Err(_) => break,
            }
        }
    };
    let idle = async {
        loop {
            let seen = Duration::from_millis(last.load(std::sync::atomic::Ordering::Relaxed));
            let quiet = start.elapsed().saturating_sub(seen);
            if quiet >= idle_after {
                break;
            }
            tokio::time::sleep(idle_after - quiet).await;
        }
    };
    tokio::select! {
        () = up => {},
        () = down => {},
        () = idle => {},
    }
}

/// One query: read it, ask the cluster's DNS (UDP, then TCP if truncated), send the answer.
async fn relay_dns(mut s: MuxStream, server: SocketAddr) {
    if write_frame(&mut s, &Frame::Reply(None)).await.is_err() {
        return;
    }
    let Ok(Some(query)) = read_data(&mut s).await else {
        return;
    };
    match ask(server, &query).await {
        Ok(answer) => {
            let _ = write_data(&mut s, &answer).await;
        }
        Err(e) => tracing::debug!(%server, error = %e, "cluster DNS did not answer"),
    }
    let _ = s.shutdown().await;
}

/// Asks the cluster's DNS over UDP (three tries of 1.5 s), then over TCP if the answer was
/// truncated or never came. Only a reply to this query counts: one whose ID or question
/// differs (a late answer to another query, or a spoofed one) is dropped.
async fn ask(server: SocketAddr, query: &[u8]) -> std::io::Result<Bytes> {
    let bind: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(server).await?;
    let mut buf = vec![0u8; 65_535];
    'tries: for _ in 0..3 {
        sock.send(query).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
        loop {
            let Ok(n) = tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await else {
                continue 'tries;
            };
            let n = n?;
            if !kt_common::dnsmsg::reply_matches(query, &buf[..n]) {
                tracing::debug!(%server, "dropped a DNS reply that does not answer the query");
                continue;
            }
            // TC: the full answer needs TCP.
            if buf[2] & 0x02 != 0 {
                break 'tries;
            }
            return Ok(Bytes::copy_from_slice(&buf[..n]));
        }
    }
    ask_tcp_bounded(server, query, DNS_TCP_TIMEOUT).await
}

/// [`ask_tcp`] within `timeout` as a whole (connect, write, read): a server that accepts and
/// then says nothing must not hold the relay.
async fn ask_tcp_bounded(
    server: SocketAddr,
    query: &[u8],
    timeout: Duration,
) -> std::io::Result<Bytes> {
    let answer = tokio::time::timeout(timeout, ask_tcp(server, query))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    if !kt_common::dnsmsg::reply_matches(query, &answer) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the TCP answer does not answer the query",
        ));
    }
    Ok(answer)
}

/// One query over TCP (RFC 7766 framing), as a whole bounded by the caller's timeout.
async fn ask_tcp(server: SocketAddr, query: &[u8]) -> std::io::Result<Bytes> {
    let mut tcp = TcpStream::connect(server).await?;
    let len = u16::try_from(query.len()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let mut msg = Vec::with_capacity(query.len() + 2);
    msg.extend_from_slice(&len.to_be_bytes());
    msg.extend_from_slice(query);
    tcp.write_all(&msg).await?;
    let mut len = [0u8; 2];
    tcp.read_exact(&mut len).await?;
    let mut answer = vec![0u8; u16::from_be_bytes(len) as usize];
    tcp.read_exact(&mut answer).await?;
    Ok(Bytes::from(answer))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(30);

    fn renewed(t: &str) -> LeaseRead {
        LeaseRead::Renewed(Some(t.to_string()))
    }

    #[test]
    fn an_unchanged_lease_expires_after_the_grace_period_and_a_renewal_resets_it() {
        let t0 = Instant::now();
        let mut w = LeaseWatch::new(GRACE, t0);
        assert_eq!(w.observe(t0, renewed("a")), Verdict::Alive);
        assert_eq!(
            w.observe(t0 + GRACE - Duration::from_secs(1), renewed("a")),
            Verdict::Alive
        );
        assert_eq!(
            w.observe(t0 + GRACE, renewed("b")),
            Verdict::Alive,
            "a renewal counts"
        );
        assert_eq!(
            w.observe(t0 + GRACE * 2, renewed("b")),
            Verdict::Alive,
            "exactly grace since the renewal is not over it"
        );
        assert_eq!(
            w.observe(t0 + GRACE * 2 + Duration::from_secs(1), renewed("b")),
            Verdict::Expired
        );
    }

    #[test]
    /// Regression: an API server outage longer than the grace period ended live sessions, as
    /// the first read after it found the Lease unchanged for "longer than grace".
    fn an_api_server_outage_of_any_length_restarts_the_grace_period() {
        let t0 = Instant::now();
        let mut w = LeaseWatch::new(GRACE, t0);
        assert_eq!(w.observe(t0, renewed("a")), Verdict::Alive);
        let mut t = t0;
        for _ in 0..60 {
            t += Duration::from_secs(2);
            assert_eq!(w.observe(t, LeaseRead::Failed), Verdict::Alive);
        }
        // Back after 2 minutes (4x grace); ktctl has not renewed yet.
        assert_eq!(w.observe(t, renewed("a")), Verdict::Alive);
        assert_eq!(
            w.observe(t + GRACE, renewed("a")),
            Verdict::Alive,
            "a full grace period from the first good read"
        );
        assert_eq!(
            w.observe(t + GRACE + Duration::from_secs(1), renewed("a")),
            Verdict::Expired
        );
    }

    #[test]
    fn a_deleted_lease_ends_the_session_at_once() {
        let t0 = Instant::now();
        let mut w = LeaseWatch::new(GRACE, t0);
        assert_eq!(w.observe(t0, LeaseRead::Gone), Verdict::Ended);
    }

    /// A stream whose other end is returned: `udp` gets the agent's side.
    async fn stream_pair() -> (MuxStream, MuxStream, Mux, Mux) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (client, _) = Mux::start(a, tunnel::Mode::Client);
        let (agent, mut inbound) = Mux::start(b, tunnel::Mode::Server);
        let mut ours = client.open().await.expect("open");
        // yamux announces a stream with its first frame.
        ours.write_all(&[]).await.expect("write");
        write_data(&mut ours, b"").await.expect("first datagram");
        let theirs = inbound.recv().await.expect("the agent's side");
        (ours, theirs, client, agent)
    }

    #[tokio::test]
    /// Regression: a UDP flow ended after a minute without datagrams from the client, even
    /// while replies kept arriving (a client that sends once and then listens).
    async fn a_udp_flow_lives_while_replies_arrive() {
        let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let dst = server.local_addr().expect("addr");
        let (mut ours, theirs, _c, _a) = stream_pair().await;
        let flow = tokio::spawn(udp(theirs, dst, Duration::from_millis(300)));
        // The client's only datagram (an empty one went first, above).
        let mut from = None;
        let mut buf = [0u8; 64];
        while from.is_none() {
            let (_, peer) = server.recv_from(&mut buf).await.expect("recv");
            from = Some(peer);
        }
        // Ten replies, 100 ms apart: 1 s in all, more than three idle periods.
        let replies = async {
            for i in 0..10u8 {
                server
                    .send_to(&[i], from.expect("peer"))
                    .await
                    .expect("send");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let mut got = vec![];
        let reader = async {
            // The Reply frame first.
            let _ = read_data(&mut ours).await;
            while got.len() < 10 {
                match read_data(&mut ours).await {
                    Ok(Some(d)) => got.extend_from_slice(&d),
                    _ => break,
                }
            }
        };
        tokio::join!(replies, reader);
        assert_eq!(
            got,
            (0..10u8).collect::<Vec<_>>(),
            "replies lost after the flow ended"
        );
        // Quiet both ways now: the flow ends.
        tokio::time::timeout(Duration::from_secs(2), flow)
            .await
            .expect("the idle flow ends")
            .expect("flow task");
    }

    #[tokio::test]
    /// Regression: a DNS server that accepted over TCP and never answered held the relay for
    /// good.
    async fn a_silent_dns_server_over_tcp_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let hold = tokio::spawn(async move {
            let (c, _) = listener.accept().await.expect("accept");
            std::future::pending::<()>().await;
            drop(c);
        });
        let query = [0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1];
        let started = Instant::now();
        let err = ask_tcp_bounded(addr, &query, Duration::from_millis(300))
            .await
            .expect_err("no answer");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(2));
        hold.abort();
    }

    #[test]
    fn backoff_grows_to_a_second_and_resets() {
        let mut b = Backoff::default();
        let first = b.next();
        assert_eq!(first, Duration::from_millis(10));
        let mut last = first;
        for _ in 0..20 {
            last = b.next();
        }
        assert_eq!(last, Duration::from_secs(1));
        b.reset();
        assert_eq!(b.next(), Duration::from_millis(10));
    }
}
