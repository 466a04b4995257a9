//! The shadow role.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::FutureExt;
use k8s_openapi::api::coordination::v1::Lease;
use kt_common::tunnel::{
    self, Identity, Mux, MuxStream, ServerInfo, StreamHandler, read_data, write_data, write_frame,
};
use kt_common::wire::{ErrorCode, Frame, Open};
use kube::Api;
use kube::api::DeleteParams;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tracing::Instrument;

/// How long a dial to a cluster address may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// A UDP flow idle this long ends.
const UDP_IDLE: Duration = Duration::from_secs(60);

/// `kt-router shadow`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address of the tunnel listener
    #[arg(long, default_value = "0.0.0.0:7443")]
    listen: SocketAddr,
    /// Folder with tls.crt, tls.key and ca.crt (the session's Secret)
    #[arg(long, default_value = "/etc/kt/tls")]
    tls_dir: PathBuf,
    /// The session id clients must present
    #[arg(long)]
    session: String,
    /// The session's anchor Lease (empty: no lease watch)
    #[arg(long, default_value = "")]
    lease: String,
    /// Seconds without a lease renewal after which the session ends
    #[arg(long, default_value_t = 30)]
    grace: u64,
    /// Namespace of the lease
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
}

pub async fn run(args: Args) -> Result<()> {
    let read = |f: &str| {
        std::fs::read_to_string(args.tls_dir.join(f))
            .with_context(|| format!("reading {}", args.tls_dir.join(f).display()))
    };
    let id = Identity {
        ca_pem: read("ca.crt")?,
        cert_pem: read("tls.crt")?,
        key_pem: read("tls.key")?,
    };
    let tls = tunnel::server_tls(&id).context("TLS setup")?;
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
    tracing::info!(listen = %args.listen, session = %args.session, ?dns, "shadow ready");
    let handler: StreamHandler = Arc::new(move |mux, open, s| handle(mux, open, s, dns).boxed());
    if !args.lease.is_empty() {
        tokio::spawn(watch_lease(
            args.namespace.clone(),
            args.lease.clone(),
            Duration::from_secs(args.grace),
        ));
    }
    loop {
        let (conn, peer) = listener.accept().await.context("accept")?;
        let _ = conn.set_nodelay(true);
        let (tls, info, handler) = (tls.clone(), info.clone(), handler.clone());
        tokio::spawn(
            async move {
                tracing::info!("tunnel connection");
                match tunnel::serve_connection(conn, tls, info, handler).await {
                    Ok(()) => tracing::info!("tunnel connection closed"),
                    Err(e) => tracing::warn!(error = %e, "tunnel connection refused or failed"),
                }
            }
            .instrument(tracing::info_span!("conn", %peer)),
        );
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

/// Ends the session when the Lease has not changed for longer than `grace`: ktctl is gone.
/// Staleness is measured on this pod's clock from the last change seen, so clock skew between
/// the developer's machine and the cluster does not matter.
async fn watch_lease(ns: String, name: String, grace: Duration) {
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "no in-cluster API access; the session cannot end by itself");
            return;
        }
    };
    let api: Api<Lease> = Api::namespaced(client, &ns);
    let mut last_seen: Option<String> = None;
    let mut changed_at = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        match api.get_opt(&name).await {
            Ok(None) => {
                tracing::info!(lease = %name, "session ended (lease deleted); exiting");
                std::process::exit(0);
            }
            Ok(Some(l)) => {
                let renew = l.spec.and_then(|s| s.renew_time).map(|t| t.0.to_string());
                if renew != last_seen {
                    last_seen = renew;
                    changed_at = Instant::now();
                } else if changed_at.elapsed() > grace {
                    tracing::warn!(lease = %name, ?grace, "ktctl has been gone longer than the grace period; ending the session");
                    match api.delete(&name, &DeleteParams::background()).await {
                        Ok(_) => std::process::exit(0),
                        Err(e) => tracing::error!(error = %e, "cannot delete the session's lease"),
                    }
                }
            }
            Err(e) => tracing::warn!(lease = %name, error = %e, "cannot read the session's lease"),
        }
    }
}

async fn handle(mux: Mux, open: Open, s: MuxStream, dns: Option<SocketAddr>) {
    let span = tracing::debug_span!("stream", ?open);
    async move {
        match open {
            Open::Tcp(dst) => tcp(s, dst).await,
            Open::Udp(dst) => udp(s, dst).await,
            Open::Dns => match dns {
                Some(server) => relay_dns(s, server).await,
                None => {
                    tunnel::refuse(s, ErrorCode::Unsupported, "the shadow has no resolver").await
                }
            },
            Open::Expose { port } => expose(mux, s, port).await,
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

async fn udp(mut s: MuxStream, dst: SocketAddr) {
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
    let up = async {
        while let Ok(Ok(Some(d))) = tokio::time::timeout(UDP_IDLE, read_data(&mut r)).await {
            if sock.send(&d).await.is_err() {
                break;
            }
        }
    };
    let down = async {
        loop {
            match tokio::time::timeout(UDP_IDLE, sock.recv(&mut buf)).await {
                Ok(Ok(n)) => {
                    if write_data(&mut w, &buf[..n]).await.is_err() {
                        break;
                    }
                }
                // ICMP port unreachable and friends: keep the flow, as a socket would.
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                _ => break,
            }
        }
    };
    tokio::select! {
        () = up => {},
        () = down => {},
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

async fn ask(server: SocketAddr, query: &[u8]) -> std::io::Result<Bytes> {
    let bind: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(server).await?;
    let mut buf = vec![0u8; 65_535];
    for _ in 0..3 {
        sock.send(query).await?;
        if let Ok(n) = tokio::time::timeout(Duration::from_millis(1500), sock.recv(&mut buf)).await
        {
            let n = n?;
            // TC: the full answer needs TCP.
            if n >= 3 && buf[2] & 0x02 != 0 {
                break;
            }
            return Ok(Bytes::copy_from_slice(&buf[..n]));
        }
    }
    let mut tcp = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(server))
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)??;
    let mut msg = Vec::with_capacity(query.len() + 2);
    msg.extend_from_slice(&(query.len() as u16).to_be_bytes());
    msg.extend_from_slice(query);
    tcp.write_all(&msg).await?;
    let mut len = [0u8; 2];
    tcp.read_exact(&mut len).await?;
    let mut answer = vec![0u8; u16::from_be_bytes(len) as usize];
    tcp.read_exact(&mut answer).await?;
    Ok(Bytes::from(answer))
}

/// Listens on `port` in the pod while the Expose stream stays open; each connection becomes
/// an Inbound stream toward ktctl.
async fn expose(mux: Mux, mut s: MuxStream, port: u16) {
    let listener = match TcpListener::bind(("0.0.0.0", port)).await {
        Ok(l) => l,
        Err(e) => {
            return tunnel::refuse(
                s,
                ErrorCode::from_io(&e),
                &format!("port {port} in the shadow: {e}"),
            )
            .await;
        }
    };
    if write_frame(&mut s, &Frame::Reply(None)).await.is_err() {
        return;
    }
    tracing::info!(port, "exposing a local port");
    let mut probe = [0u8; 1];
    loop {
        tokio::select! {
            // The client closed the Expose stream: stop listening.
            _ = s.read(&mut probe) => break,
            accepted = listener.accept() => {
                let Ok((conn, peer)) = accepted else { continue };
                let mux = mux.clone();
                tokio::spawn(async move {
                    let _ = conn.set_nodelay(true);
                    match mux.request(Open::Inbound { port, peer }).await {
                        Ok(st) => tunnel::splice(conn, st, 64 * 1024).await,
                        Err(e) => tracing::warn!(%peer, port, error = %e, "the developer's side refused an inbound connection"),
                    }
                });
            }
        }
    }
    tracing::info!(port, "no longer exposing");
}
