//! The tunnel from ktctl to its shadow: a Kubernetes port-forward to the shadow's tunnel port,
//! TLS 1.3 with the session's client certificate, yamux. When the port-forward drops, a task
//! reconnects by itself: streams in flight fail at once, new ones wait (a few seconds at most)
//! for the next connection.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kt_common::tunnel::{
    self, ClientSession, MuxStream, TunnelError, read_frame_timeout, write_frame,
};
use kt_common::wire::{ErrorCode, Frame, MAX_CONTROL_FRAME, Open};
use kube::Api;
use tokio::sync::watch;
use tracing::Instrument;

use crate::cluster::ClusterError;

/// Keepalive period; a session is declared dead after three missed pongs.
pub const KEEPALIVE: Duration = Duration::from_secs(5);
/// How long a new stream waits for a tunnel while one is being re-established.
pub const OPEN_WAIT: Duration = Duration::from_secs(8);

/// Where the tunnel goes.
#[derive(Clone)]
pub struct Target {
    pub pods: Api<Pod>,
    pub pod: String,
    pub port: u16,
    pub tls: tokio_rustls::TlsConnector,
    pub session: String,
}

/// A self-healing tunnel; cheap to clone.
#[derive(Clone)]
pub struct Tunnel {
    current: watch::Receiver<Option<ClientSession>>,
    keeper: tokio::task::AbortHandle,
}

impl Tunnel {
    /// Connects (retrying for up to `first_timeout`, as a port-forward can fail for a moment
    /// after the pod turns ready), then keeps the tunnel up in the background.
    pub async fn start(
        target: Target,
        first_timeout: Duration,
    ) -> Result<Tunnel, crate::error::Error> {
        let started = Instant::now();
        let first = loop {
            match connect_once(&target).await {
                Ok(x) => break x,
                Err(e) if started.elapsed() < first_timeout && !is_fatal(&e) => {
                    tracing::debug!(error = %e, "tunnel not up yet; retrying");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let session = first.0.clone();
        tracing::info!(
            "Port forward to pod {}:{} established; tunnel up (TLS 1.3, {})",
            target.pod,
            target.port,
            session.welcome.agent
        );
        let (tx, rx) = watch::channel(Some(session));
        let keeper =
            tokio::spawn(keep_up(target, first, tx).instrument(tracing::info_span!("tunnel")))
                .abort_handle();
        Ok(Tunnel {
            current: rx,
            keeper,
        })
    }

    /// Ends the tunnel for good: no reconnect, the port-forward closed, streams in flight fail.
    pub fn close(&self) {
        self.keeper.abort();
        if let Some(s) = self.current.borrow().as_ref() {
            s.mux.close();
        }
    }

    /// The current session, waiting up to [`OPEN_WAIT`] while a reconnect is under way.
    pub async fn session(&self) -> Result<ClientSession, TunnelError> {
        let mut rx = self.current.clone();
        let wait = async {
            loop {
                if let Some(s) = rx.borrow_and_update().clone()
                    && !s.mux.is_closed()
                {
                    return Ok(s);
                }
                if rx.changed().await.is_err() {
                    return Err(TunnelError::Closed("the tunnel task ended".into()));
                }
            }
        };
        tokio::time::timeout(OPEN_WAIT, wait)
            .await
            .map_err(|_| TunnelError::Timeout("the tunnel to come back"))?
    }

    /// Opens a stream (without an Open frame yet: callers pipeline it with their data).
    pub async fn stream(&self) -> Result<MuxStream, TunnelError> {
        self.session().await?.mux.open().await
    }

    /// Opens a stream and waits for the agent's reply to `open`.
    pub async fn request(&self, open: Open) -> Result<MuxStream, TunnelError> {
        self.session().await?.mux.request(open).await
    }
}

type Connected = (ClientSession, tokio::sync::mpsc::Receiver<MuxStream>);

/// Errors that waiting will not cure: the agent refused us, or RBAC forbids the port-forward.
fn is_fatal(e: &crate::error::Error) -> bool {
    matches!(
        e,
        crate::error::Error::Tunnel(TunnelError::Rejected(_))
            | crate::error::Error::Cluster(ClusterError::Forbidden(_))
    )
}

async fn connect_once(t: &Target) -> Result<Connected, crate::error::Error> {
    let stream = crate::cluster::portforward::open(&t.pods, &t.pod, t.port).await?;
    let client = format!(
        "ktctl {} ({})",
        env!("CARGO_PKG_VERSION"),
        std::process::id()
    );
    Ok(ClientSession::connect(stream, &t.tls, &t.session, &client, KEEPALIVE).await?)
}

async fn keep_up(target: Target, first: Connected, tx: watch::Sender<Option<ClientSession>>) {
    let (mut session, mut inbound) = first;
    let mut reconnects = 0u64;
    loop {
        let serving = tokio::spawn(serve_inbound(inbound));
        session.mux.closed().await;
        serving.abort();
        let _ = tx.send(None);
        tracing::warn!("tunnel lost; reconnecting");
        let lost = Instant::now();
        let mut delay = Duration::from_millis(100);
        let next = loop {
            match connect_once(&target).await {
                Ok(x) => break x,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "tunnel reconnect failed");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        };
        reconnects += 1;
        (session, inbound) = next;
        tracing::info!(reconnects, after = ?lost.elapsed(), "tunnel re-established");
        let _ = tx.send(Some(session.clone()));
    }
}

/// Streams the shadow opens toward ktctl: connections accepted on exposed ports go to the
/// local port; diagnostics are answered.
async fn serve_inbound(mut inbound: tokio::sync::mpsc::Receiver<MuxStream>) {
    while let Some(mut s) = inbound.recv().await {
        tokio::spawn(async move {
            let open = match read_frame_timeout(&mut s, MAX_CONTROL_FRAME, "an open").await {
                Ok(Frame::Open(o)) => o,
                Ok(other) => {
                    tunnel::refuse(
                        s,
                        ErrorCode::BadRequest,
                        &format!("expected an open, got {other:?}"),
                    )
                    .await;
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "inbound stream ended before its open");
                    return;
                }
            };
            match open {
                Open::Inbound { port, peer } => inbound_to_local(s, port, peer).await,
                other => {
                    if let Some(s) = tunnel::serve_diagnostic(&other, s).await {
                        tunnel::refuse(s, ErrorCode::Unsupported, "ktctl does not serve this")
                            .await;
                    }
                }
            }
        });
    }
}

async fn inbound_to_local(mut s: MuxStream, port: u16, peer: SocketAddr) {
    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    match tokio::net::TcpStream::connect(local).await {
        Ok(conn) => {
            let _ = conn.set_nodelay(true);
            if write_frame(&mut s, &Frame::Reply(None)).await.is_ok() {
                tunnel::splice(conn, s, 64 * 1024).await;
            }
        }
        Err(e) => {
            tracing::warn!(%peer, port, error = %e, "inbound connection: local port refused");
            tunnel::refuse(
                s,
                ErrorCode::from_io(&e),
                &format!("127.0.0.1:{port} on the developer's machine: {e}"),
            )
            .await;
        }
    }
}
