//! The tunnel from ktctl to its shadow: a Kubernetes port-forward to the shadow's tunnel port,
//! TLS 1.3 with the session's client certificate and the shadow's pinned certificate, yamux.
//!
//! When the connection drops, a task reconnects by itself: streams in flight fail at once, new
//! ones wait (a few seconds at most) for the next connection. Before each attempt the shadow
//! is checked: if its pod is gone (deleted, evicted, its node lost) or is another pod with the
//! same name, a new shadow is started for the same session and pinned afresh, instead of
//! knocking on a dead pod's name forever.
//!
//! The cluster side can open streams too, but ktctl answers only [`Open::Inbound`] for ports
//! this session exposes (none for `connect`) and the diagnostics; anything else is refused
//! and logged, so a compromised or impostor shadow cannot reach this machine's local ports.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;
use kt_common::tunnel::{
    self, ClientSession, MuxStream, ServerPin, TunnelError, read_frame_timeout, write_frame,
};
use kt_common::wire::{ErrorCode, Frame, MAX_CONTROL_FRAME, Open};
use kube::Api;
use tokio::sync::watch;
use tracing::Instrument;

use crate::cluster::ClusterError;
use crate::error::Error;

/// Keepalive period; a session is declared dead after three missed pongs.
pub const KEEPALIVE: Duration = Duration::from_secs(5);
/// How long a new stream waits for a tunnel while one is being re-established.
pub const OPEN_WAIT: Duration = Duration::from_secs(8);

/// A live connection to the shadow and the streams it opens toward ktctl.
pub type Connected = (ClientSession, tokio::sync::mpsc::Receiver<MuxStream>);

/// Why an attempt to reach the shadow failed.
#[derive(Debug)]
pub enum Attempt {
    /// The shadow is gone for good (its pod was deleted, ended, or is another pod now): only
    /// a new shadow helps.
    Lost(String),
    /// Anything else (the port-forward, TLS, the API server): trying again may help.
    Failed(Error),
}

/// The seam between the tunnel and the cluster: reaches the session's current shadow and
/// replaces a lost one. [`KubeShadow`] is the real one; tests fake it.
pub trait Shadow: Send + Sync + 'static {
    /// Connects to the current shadow.
    fn connect(&self) -> BoxFuture<'_, Result<Connected, Attempt>>;
    /// Starts a new shadow for the session (the current one is lost); returns its name.
    fn replace(&self) -> BoxFuture<'_, Result<String, Error>>;
    /// The current shadow's name, for messages.
    fn name(&self) -> String;
}

/// Remote port -> local port of each exposure of this session.
pub type Exposures = Arc<RwLock<HashMap<u16, u16>>>;

/// A self-healing tunnel; cheap to clone.
#[derive(Clone)]
pub struct Tunnel {
    current: watch::Receiver<Option<ClientSession>>,
    keeper: tokio::task::AbortHandle,
    exposures: Exposures,
}

impl Tunnel {
    /// Connects (retrying for up to `first_timeout`, as a port-forward can fail for a moment
    /// after the pod turns ready), then keeps the tunnel up in the background.
    pub async fn start(shadow: Arc<dyn Shadow>, first_timeout: Duration) -> Result<Tunnel, Error> {
        let started = Instant::now();
        let first = loop {
            match shadow.connect().await {
                Ok(x) => break x,
                Err(Attempt::Failed(e)) if started.elapsed() < first_timeout && !is_fatal(&e) => {
                    tracing::debug!(error = %e, "tunnel not up yet; retrying");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Err(Attempt::Failed(e)) => return Err(e),
                Err(Attempt::Lost(why)) => {
                    return Err(Error::Runtime(format!(
                        "shadow pod {}: {why}",
                        shadow.name()
                    )));
                }
            }
        };
        let session = first.0.clone();
        tracing::info!(
            "Port forward to pod {} established; tunnel up (TLS 1.3, {})",
            shadow.name(),
            session.welcome.agent
        );
        let exposures = Exposures::default();
        let (tx, rx) = watch::channel(Some(session));
        let keeper = tokio::spawn(
            keep_up(shadow, first, tx, exposures.clone()).instrument(tracing::info_span!("tunnel")),
        )
        .abort_handle();
        Ok(Tunnel {
            current: rx,
            keeper,
            exposures,
        })
    }

    /// Ends the tunnel for good: no reconnect, the port-forward closed, streams in flight fail.
    pub fn close(&self) {
        self.keeper.abort();
        if let Some(s) = self.current.borrow().as_ref() {
            s.mux.close();
        }
    }

    /// The exposures the cluster side may open inbound streams for.
    pub fn exposures(&self) -> &Exposures {
        &self.exposures
    }

    /// Exposes `remote` (a port the shadow listens on) as `local` on this machine: connections
    /// the shadow accepts there come here and are dialled to 127.0.0.1:`local`. Registered
    /// first, so that every reconnect replays it; exposing twice is harmless.
    pub async fn expose(&self, remote: u16, local: u16) -> Result<(), TunnelError> {
        self.exposures
            .write()
            .expect("exposures lock")
            .insert(remote, local);
        attach(&self.session().await?.mux, remote).await
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

/// Errors that waiting will not cure: the agent refused us, or RBAC forbids the port-forward.
fn is_fatal(e: &Error) -> bool {
    matches!(
        e,
        Error::Tunnel(TunnelError::Rejected(_)) | Error::Cluster(ClusterError::Forbidden(_))
    )
}

async fn keep_up(
    shadow: Arc<dyn Shadow>,
    first: Connected,
    tx: watch::Sender<Option<ClientSession>>,
    exposures: Exposures,
) {
    let (mut session, mut inbound) = first;
    let mut reconnects = 0u64;
    loop {
        let serving = tokio::spawn(serve_inbound(inbound, exposures.clone()));
        session.mux.closed().await;
        serving.abort();
        let _ = tx.send(None);
        tracing::warn!("tunnel lost; reconnecting");
        let lost = Instant::now();
        let mut delay = Duration::from_millis(100);
        let next = loop {
            match shadow.connect().await {
                Ok(x) => break x,
                Err(Attempt::Lost(why)) => {
                    tracing::warn!(
                        "Shadow pod {} is gone ({why}); starting a new shadow for this session",
                        shadow.name()
                    );
                    match shadow.replace().await {
                        Ok(name) => {
                            tracing::info!("New shadow pod {name} is ready");
                            delay = Duration::from_millis(100);
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, retry_in = ?delay, "cannot start a new shadow")
                        }
                    }
                }
                Err(Attempt::Failed(e)) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "tunnel reconnect failed");
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        };
        reconnects += 1;
        (session, inbound) = next;
        let ports: Vec<u16> = exposures
            .read()
            .expect("exposures lock")
            .keys()
            .copied()
            .collect();
        for port in ports {
            if let Err(e) = attach(&session.mux, port).await {
                tracing::warn!(port, error = %e, "cannot expose the port again after the reconnect");
            }
        }
        tracing::info!(reconnects, after = ?lost.elapsed(), "tunnel re-established");
        let _ = tx.send(Some(session.clone()));
    }
}

/// Asks the shadow to hand the connections it accepts on `port` to this tunnel connection; the
/// Expose stream is held open for as long as the connection lives.
async fn attach(mux: &kt_common::tunnel::Mux, port: u16) -> Result<(), TunnelError> {
    let mut s = mux.request(Open::Expose { port }).await?;
    tokio::spawn(async move {
        let mut probe = [0u8; 1];
        let _ = tokio::io::AsyncReadExt::read(&mut s, &mut probe).await;
    });
    Ok(())
}

/// Streams the shadow opens toward ktctl: connections accepted on exposed ports go to their
/// local port; diagnostics are answered; anything else is refused.
pub async fn serve_inbound(
    mut inbound: tokio::sync::mpsc::Receiver<MuxStream>,
    exposures: Exposures,
) {
    while let Some(mut s) = inbound.recv().await {
        let exposures = exposures.clone();
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
                Open::Inbound { port, peer } => {
                    let local = exposures
                        .read()
                        .expect("exposures lock")
                        .get(&port)
                        .copied();
                    match local {
                        Some(local) => inbound_to_local(s, local, peer).await,
                        None => {
                            tracing::warn!(%peer, port, "refused an inbound connection for a port this session does not expose");
                            tunnel::refuse(
                                s,
                                ErrorCode::Denied,
                                &format!("port {port} is not exposed by this session"),
                            )
                            .await;
                        }
                    }
                }
                other => {
                    if let Some(s) = tunnel::serve_diagnostic(&other, s).await {
                        tracing::warn!(open = ?other, "refused a stream the shadow opened");
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

/// The session's shadow in the cluster, reached through the API server's port-forward.
pub struct KubeShadow {
    pods: Api<Pod>,
    port: u16,
    tls: tokio_rustls::TlsConnector,
    pin: ServerPin,
    session_id: String,
    /// Name and UID of the current shadow pod, and how many shadows came before it.
    current: Mutex<(String, String, u32)>,
    replace: Box<dyn Fn(u32) -> BoxFuture<'static, Result<Pod, Error>> + Send + Sync>,
}

impl KubeShadow {
    /// The shadow `pod` (just started, pinned on the first connection); `replace(n)` starts
    /// the session's `n`th shadow and returns its pod once ready.
    pub fn new(
        pods: Api<Pod>,
        pod: &Pod,
        port: u16,
        tls: tokio_rustls::TlsConnector,
        pin: ServerPin,
        session_id: String,
        replace: Box<dyn Fn(u32) -> BoxFuture<'static, Result<Pod, Error>> + Send + Sync>,
    ) -> KubeShadow {
        KubeShadow {
            pods,
            port,
            tls,
            pin,
            session_id,
            current: Mutex::new((
                pod.metadata.name.clone().unwrap_or_default(),
                pod.metadata.uid.clone().unwrap_or_default(),
                0,
            )),
            replace,
        }
    }

    /// Why the pod named `name` is not (or no longer) the shadow with `uid`, if it is not.
    async fn check(&self, name: &str, uid: &str) -> Result<Option<String>, Error> {
        let pod = self
            .pods
            .get_opt(name)
            .await
            .map_err(|e| ClusterError::api(format!("reading pod {name}"), e))?;
        let Some(pod) = pod else {
            return Ok(Some("deleted".into()));
        };
        if pod.metadata.uid.as_deref() != Some(uid) {
            return Ok(Some(
                "another pod has its name now; ktctl will not talk to it".into(),
            ));
        }
        if pod.metadata.deletion_timestamp.is_some() {
            return Ok(Some("being deleted".into()));
        }
        let phase = pod.status.and_then(|s| s.phase).unwrap_or_default();
        if phase == "Failed" || phase == "Succeeded" {
            return Ok(Some(format!("it ended ({phase})")));
        }
        Ok(None)
    }

    async fn connect_once(&self) -> Result<Connected, Attempt> {
        let (name, uid, _) = self.current.lock().expect("shadow lock").clone();
        if let Some(why) = self.check(&name, &uid).await.map_err(Attempt::Failed)? {
            return Err(Attempt::Lost(why));
        }
        let fresh = self.pin.pinned().is_none();
        let stream = crate::cluster::portforward::open(&self.pods, &name, self.port)
            .await
            .map_err(|e| Attempt::Failed(e.into()))?;
        let client = format!(
            "ktctl {} ({})",
            env!("CARGO_PKG_VERSION"),
            std::process::id()
        );
        let connected =
            ClientSession::connect(stream, &self.tls, &self.session_id, &client, KEEPALIVE)
                .await
                .map_err(|e| Attempt::Failed(e.into()))?;
        if fresh {
            // The certificate just pinned came through a port-forward to the pod *named*
            // `name`. If that name still belongs to the pod with our UID, it did then too
            // (a deleted pod's UID never comes back), so the pin is the shadow's own key.
            let refused = match self.check(&name, &uid).await {
                Ok(None) => None,
                Ok(Some(why)) => Some(Attempt::Lost(why)),
                Err(e) => Some(Attempt::Failed(e)),
            };
            if let Some(attempt) = refused {
                connected.0.mux.close();
                self.pin.refuse_all();
                return Err(attempt);
            }
        }
        Ok(connected)
    }
}

impl Shadow for KubeShadow {
    fn connect(&self) -> BoxFuture<'_, Result<Connected, Attempt>> {
        Box::pin(self.connect_once())
    }

    fn replace(&self) -> BoxFuture<'_, Result<String, Error>> {
        Box::pin(async move {
            // Counted before the attempt: a shadow that failed to start keeps its name.
            let n = {
                let mut c = self.current.lock().expect("shadow lock");
                c.2 += 1;
                c.2
            };
            let pod = (self.replace)(n).await?;
            let name = pod.metadata.name.clone().unwrap_or_default();
            self.pin.trust_next();
            *self.current.lock().expect("shadow lock") = (
                name.clone(),
                pod.metadata.uid.clone().unwrap_or_default(),
                n,
            );
            Ok(name)
        })
    }

    fn name(&self) -> String {
        self.current.lock().expect("shadow lock").0.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use futures::FutureExt;
    use kt_common::pki::{SessionPki, agent_identity};
    use kt_common::tunnel::{Mux, ServerInfo, StreamHandler};

    use super::*;

    const SESSION: &str = "unit01";

    /// A shadow in memory: each connect runs a real agent (TLS, handshake, diagnostics) over
    /// an in-memory pipe that the test can cut, as a deleted pod cuts its port-forward.
    struct FakeShadow {
        pki: SessionPki,
        pin: ServerPin,
        agent: Mutex<kt_common::tunnel::Identity>,
        lost: AtomicBool,
        replaced: AtomicUsize,
        pipes: Mutex<Vec<tokio::task::AbortHandle>>,
        /// The ports of the Expose streams each agent received.
        exposed: Arc<Mutex<Vec<u16>>>,
    }

    impl FakeShadow {
        fn new() -> FakeShadow {
            FakeShadow {
                pki: SessionPki::generate(SESSION, 1).expect("pki"),
                pin: ServerPin::trust_first(),
                agent: Mutex::new(agent_identity(SESSION, 1).expect("agent")),
                lost: AtomicBool::new(false),
                replaced: AtomicUsize::new(0),
                pipes: Mutex::new(vec![]),
                exposed: Arc::default(),
            }
        }

        /// The pod dies: its connections drop and it is gone.
        fn kill(&self) {
            self.lost.store(true, Ordering::SeqCst);
            for p in self.pipes.lock().expect("pipes").drain(..) {
                p.abort();
            }
        }
    }

    impl Shadow for FakeShadow {
        fn connect(&self) -> BoxFuture<'_, Result<Connected, Attempt>> {
            async move {
                if self.lost.load(Ordering::SeqCst) {
                    return Err(Attempt::Lost("deleted".into()));
                }
                let (client_io, mut a) = tokio::io::duplex(1 << 16);
                let (mut b, server_io) = tokio::io::duplex(1 << 16);
                let pipe = tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                });
                self.pipes.lock().expect("pipes").push(pipe.abort_handle());
                let tls = kt_common::tunnel::server_tls(
                    &self.agent.lock().expect("agent"),
                    &self.pki.client_ca_pem,
                )
                .expect("server tls");
                let info = Arc::new(ServerInfo {
                    session: SESSION.into(),
                    agent: "fake".into(),
                    pod_ip: None,
                    dns: None,
                    idle: Duration::from_secs(30),
                });
                let exposed = self.exposed.clone();
                let handler: StreamHandler =
                    Arc::new(move |_mux: Mux, open: Open, mut s: MuxStream| {
                        let exposed = exposed.clone();
                        async move {
                            if let Open::Expose { port } = open {
                                exposed.lock().expect("exposed").push(port);
                                let _ = write_frame(&mut s, &Frame::Reply(None)).await;
                                let mut probe = [0u8; 1];
                                let _ = tokio::io::AsyncReadExt::read(&mut s, &mut probe).await;
                                return;
                            }
                            if let Some(s) = tunnel::serve_diagnostic(&open, s).await {
                                tunnel::refuse(s, ErrorCode::Unsupported, "no").await;
                            }
                        }
                        .boxed()
                    });
                tokio::spawn(tunnel::serve_connection(server_io, tls, info, handler, ()));
                let tls = tunnel::client_tls(&self.pki.client, &self.pin).expect("client tls");
                ClientSession::connect(client_io, &tls, SESSION, "test", KEEPALIVE)
                    .await
                    .map_err(|e| Attempt::Failed(e.into()))
            }
            .boxed()
        }

        fn replace(&self) -> BoxFuture<'_, Result<String, Error>> {
            async move {
                *self.agent.lock().expect("agent") = agent_identity(SESSION, 1).expect("agent");
                self.pin.trust_next();
                self.lost.store(false, Ordering::SeqCst);
                let n = self.replaced.fetch_add(1, Ordering::SeqCst) + 1;
                Ok(format!("fake-{n}"))
            }
            .boxed()
        }

        fn name(&self) -> String {
            "fake".into()
        }
    }

    #[tokio::test]
    /// Regression: a deleted shadow left the tunnel retrying the dead pod forever.
    async fn a_lost_shadow_is_replaced_and_new_streams_work_again() {
        let fake = Arc::new(FakeShadow::new());
        let tunnel = Tunnel::start(fake.clone(), Duration::from_secs(5))
            .await
            .expect("tunnel");
        tunnel.request(Open::Echo).await.expect("echo before");
        fake.kill();
        let started = Instant::now();
        loop {
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(2), tunnel.request(Open::Echo)).await
            {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the tunnel never came back"
            );
        }
        assert_eq!(fake.replaced.load(Ordering::SeqCst), 1);
        tunnel.close();
    }

    #[tokio::test]
    /// An exposure must outlive a reconnect: ktctl replays it on the new connection, or the
    /// shadow would keep callers waiting for a tunnel that never claims the port.
    async fn exposures_are_replayed_after_a_reconnect() {
        let fake = Arc::new(FakeShadow::new());
        let tunnel = Tunnel::start(fake.clone(), Duration::from_secs(5))
            .await
            .expect("tunnel");
        tunnel.expose(80, 8080).await.expect("expose");
        tunnel.expose(9090, 9090).await.expect("expose");
        assert_eq!(*fake.exposed.lock().expect("exposed"), vec![80, 9090]);
        fake.kill();
        let started = Instant::now();
        while fake.exposed.lock().expect("exposed").len() < 4 {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "not replayed: {:?}",
                fake.exposed.lock().expect("exposed")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut again = fake.exposed.lock().expect("exposed")[2..].to_vec();
        again.sort_unstable();
        assert_eq!(again, vec![80, 9090]);
        assert_eq!(
            tunnel.exposures().read().expect("lock").get(&80),
            Some(&8080),
            "remote 80 maps to local 8080"
        );
        tunnel.close();
    }

    /// A client mux whose inbound streams ktctl serves with `exposures`, and the agent's mux.
    fn mux_pair(exposures: Exposures) -> (Mux, Mux) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (client, inbound) = Mux::start(a, yamux::Mode::Client);
        let (agent, _) = Mux::start(b, yamux::Mode::Server);
        tokio::spawn(serve_inbound(inbound, exposures));
        (client, agent)
    }

    #[tokio::test]
    /// Regression: ktctl dialled 127.0.0.1:<port> for any inbound stream the shadow opened,
    /// so a compromised shadow could reach every local port of the developer's machine.
    async fn an_inbound_stream_for_a_port_not_exposed_is_refused_and_nothing_is_dialled() {
        let local = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = local.local_addr().expect("addr").port();
        let peer: SocketAddr = "10.244.1.9:41000".parse().expect("addr");
        let exposures = Exposures::default();
        let (_client, agent) = mux_pair(exposures.clone());
        let err = agent
            .request(Open::Inbound { port, peer })
            .await
            .expect_err("refused");
        match err {
            TunnelError::Io(e) => assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied),
            other => panic!("unexpected {other}"),
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(300), local.accept())
                .await
                .is_err(),
            "the local listener saw a connection"
        );
        // Exposed (remote 8080 -> the local port): the connection arrives.
        exposures.write().expect("lock").insert(8080, port);
        agent
            .request(Open::Inbound { port: 8080, peer })
            .await
            .expect("accepted");
        tokio::time::timeout(Duration::from_secs(5), local.accept())
            .await
            .expect("in time")
            .expect("a connection");
    }
}
