//! TCP: accept on the steered listener, open a stream to the original destination, splice.

use std::net::SocketAddr;

use kt_common::tunnel::{self, write_frame};
use kt_common::wire::{Frame, Open};
use socket2::SockRef;
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use super::OrigDst;
use crate::tunnel::Tunnel;

/// Makes the listener sk_lookup steers to: loopback, any port, a deep backlog for bursts of
/// new connections.
pub fn listener() -> std::io::Result<std::net::TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    s.listen(4096)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Accepts forever.
pub async fn serve(listener: TcpListener, orig: OrigDst, tunnel: Tunnel) {
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(dst) = conn.local_addr().ok().and_then(|a| orig.resolve(a)) else {
            tracing::warn!(%peer, local = ?conn.local_addr(), "connection to an address that is no alias; closing");
            continue;
        };
        let tunnel = tunnel.clone();
        tokio::spawn(
            handle(conn, dst, tunnel).instrument(tracing::debug_span!("tcp", %dst, client = %peer)),
        );
    }
}

/// One connection: the Open goes out with the first bytes (no round trip before the client's
/// request leaves); a failed open resets the client's connection, as a refused connect would.
async fn handle(mut conn: TcpStream, dst: SocketAddr, tunnel: Tunnel) {
    let _ = conn.set_nodelay(true);
    let mut stream = match tunnel.stream().await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%dst, error = %e, "no tunnel for a new connection");
            reset(&conn);
            return;
        }
    };
    if write_frame(&mut stream, &Frame::Open(Open::Tcp(dst)))
        .await
        .is_err()
    {
        reset(&conn);
        return;
    }
    if let Err(e) = tunnel::splice_opened(&mut conn, stream).await {
        tracing::debug!(%dst, error = %e, "the cluster refused the connection");
        reset(&conn);
    }
}

/// Closes with RST, so the client sees ECONNRESET rather than a clean but empty reply.
fn reset(conn: &TcpStream) {
    let _ = SockRef::from(conn).set_linger(Some(std::time::Duration::ZERO));
}
