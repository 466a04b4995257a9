//! Exposed ports: the shadow's listeners for `exchange`, `mesh` and `preview`.
//!
//! A listener belongs to the session, not to a tunnel connection: it is bound when the shadow
//! starts (`--expose`, before the pod turns ready, so a Service never sends traffic to a port
//! nobody listens on) or on the first `Open::Expose` for its port, and it lives until the
//! shadow exits. Each `Open::Expose` stream names the tunnel connection that accepted
//! connections go to; while ktctl reconnects there is none, and a new connection waits up to
//! [`HANDOFF_WAIT`] for the next one instead of failing. Exposing a port twice (ktctl replays
//! its exposures after every reconnect) only moves it to the newer connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kt_common::tunnel::{self, Mux, MuxStream, write_frame};
use kt_common::wire::{ErrorCode, Frame, Open};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::shadow::Backoff;

/// How long an accepted connection waits for ktctl's tunnel while it reconnects.
pub const HANDOFF_WAIT: Duration = Duration::from_secs(10);

/// The tunnel connection of an exposed port: the generation of the `Open::Expose` that set
/// it (so that an older stream closing does not clear a newer one) and its multiplexer.
type Current = Option<(u64, Mux)>;

/// The session's exposed ports.
#[derive(Default)]
pub struct Exposed {
    ports: Mutex<HashMap<u16, watch::Sender<Current>>>,
    generation: AtomicU64,
}

impl Exposed {
    /// Listens on `port` for the rest of the session, if not yet.
    pub async fn listen(&self, port: u16) -> std::io::Result<()> {
        if self.ports.lock().expect("ports").contains_key(&port) {
            return Ok(());
        }
        let listener = TcpListener::bind(("0.0.0.0", port)).await?;
        let mut ports = self.ports.lock().expect("ports");
        if ports.contains_key(&port) {
            // Another Expose bound it meanwhile; ours is dropped.
            return Ok(());
        }
        let (tx, rx) = watch::channel(None);
        ports.insert(port, tx);
        tokio::spawn(accept(listener, port, rx));
        tracing::info!(port, "listening on an exposed port");
        Ok(())
    }

    /// Serves an `Open::Expose` stream: connections accepted on `port` go to `mux` until the
    /// stream (or the tunnel connection) closes or a newer Expose of the port takes over.
    pub async fn expose(&self, mux: Mux, mut s: MuxStream, port: u16) {
        if let Err(e) = self.listen(port).await {
            return tunnel::refuse(
                s,
                ErrorCode::from_io(&e),
                &format!("port {port} in the shadow: {e}"),
            )
            .await;
        }
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let tx = self
            .ports
            .lock()
            .expect("ports")
            .get(&port)
            .cloned()
            .expect("listening");
        tx.send_replace(Some((generation, mux.clone())));
        if write_frame(&mut s, &Frame::Reply(None)).await.is_err() {
            clear(&tx, generation);
            return;
        }
        tracing::info!(port, "exposed port attached to the tunnel");
        let mut probe = [0u8; 1];
        tokio::select! {
            _ = s.read(&mut probe) => {},
            () = mux.closed() => {},
        }
        if clear(&tx, generation) {
            tracing::info!(
                port,
                "exposed port detached; new connections wait for ktctl"
            );
        }
    }
}

/// Clears the port's connection if it is still the one `generation` set; whether it was.
fn clear(tx: &watch::Sender<Current>, generation: u64) -> bool {
    tx.send_if_modified(|c| {
        if c.as_ref().is_some_and(|(g, _)| *g == generation) {
            *c = None;
            true
        } else {
            false
        }
    })
}

/// Accepts forever; each connection is handed to the current tunnel connection.
async fn accept(listener: TcpListener, port: u16, current: watch::Receiver<Current>) {
    let mut backoff = Backoff::default();
    loop {
        match listener.accept().await {
            Ok((conn, peer)) => {
                backoff.reset();
                tokio::spawn(hand_off(conn, peer, port, current.clone()));
            }
            Err(e) => {
                let wait = backoff.next();
                tracing::warn!(port, error = %e, retry_in = ?wait, "accept failed on an exposed port");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Opens an `Open::Inbound` stream toward ktctl for one accepted connection and splices them,
/// the caller's first bytes going out with the open (no round trip first); waits up to
/// [`HANDOFF_WAIT`] for a tunnel connection. A refusal (ktctl's local port is closed) closes
/// the connection: the caller sees a reset, the session goes on.
async fn hand_off(
    mut conn: TcpStream,
    peer: SocketAddr,
    port: u16,
    mut current: watch::Receiver<Current>,
) {
    let _ = conn.set_nodelay(true);
    let wait = current.wait_for(|c| c.as_ref().is_some_and(|(_, m)| !m.is_closed()));
    let mux = match tokio::time::timeout(HANDOFF_WAIT, wait).await {
        Ok(Ok(c)) => c.as_ref().map(|(_, m)| m.clone()).expect("checked"),
        _ => {
            tracing::warn!(%peer, port, wait = ?HANDOFF_WAIT, "no tunnel to the developer's machine; closing a connection to an exposed port");
            return reset(conn);
        }
    };
    let opened = match mux.open().await {
        Ok(mut st) => write_frame(&mut st, &Frame::Open(Open::Inbound { port, peer }))
            .await
            .map(|()| st),
        Err(e) => Err(e),
    };
    let result = match opened {
        Ok(st) => tunnel::splice_opened(&mut conn, st).await,
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        tracing::warn!(%peer, port, error = %e, "the developer's side refused an inbound connection");
        reset(conn);
    }
}

/// Closes with a reset (SO_LINGER 0), as a closed port would answer.
fn reset(conn: TcpStream) {
    let _ = conn.set_zero_linger();
    drop(conn);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Answers every inbound stream with `tag` and closes it.
    fn answer(mut inbound: tokio::sync::mpsc::Receiver<MuxStream>, tag: &'static [u8]) {
        tokio::spawn(async move {
            while let Some(mut s) = inbound.recv().await {
                tokio::spawn(async move {
                    let _ = tunnel::read_frame(&mut s, 4096).await;
                    let _ = write_frame(&mut s, &Frame::Reply(None)).await;
                    let _ = s.write_all(tag).await;
                    let _ = s.shutdown().await;
                });
            }
        });
    }

    async fn get(port: u16) -> Vec<u8> {
        let mut c = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let mut out = vec![];
        let _ = c.read_to_end(&mut out).await;
        out
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port()
    }

    /// A tunnel connection whose shadow side serves Expose streams with `exposed` and whose
    /// ktctl side answers inbound streams with `tag`; returns ktctl's mux and its Expose stream.
    async fn connection(exposed: &Arc<Exposed>, port: u16, tag: &'static [u8]) -> (Mux, MuxStream) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (client, inbound) = Mux::start(a, tunnel::Mode::Client);
        let (agent, mut opened) = Mux::start(b, tunnel::Mode::Server);
        answer(inbound, tag);
        let exposed = exposed.clone();
        tokio::spawn(async move {
            while let Some(mut s) = opened.recv().await {
                if let Ok(Frame::Open(Open::Expose { port })) =
                    tunnel::read_frame(&mut s, 4096).await
                {
                    let (exposed, agent) = (exposed.clone(), agent.clone());
                    tokio::spawn(async move { exposed.expose(agent, s, port).await });
                }
            }
        });
        let s = client
            .request(Open::Expose { port })
            .await
            .expect("exposed");
        (client, s)
    }

    #[tokio::test]
    /// Regression: the listener lived as long as one Expose stream, so a tunnel reconnect
    /// closed the exposed port and callers saw "connection refused" until ktctl exposed again.
    async fn an_exposed_port_outlives_its_tunnel_connection_and_waits_for_the_next() {
        let exposed = Arc::new(Exposed::default());
        let port = free_port();
        exposed.listen(port).await.expect("listen");
        let (first, _s1) = connection(&exposed, port, b"first").await;
        assert_eq!(get(port).await, b"first");

        // The tunnel drops; a caller arrives while ktctl reconnects, and is served once the
        // next connection exposes the port again.
        first.close();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let waiting = tokio::spawn(get(port));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "the caller was not kept waiting");
        let (_second, _s2) = connection(&exposed, port, b"second").await;
        assert_eq!(waiting.await.expect("caller"), b"second");
        assert_eq!(get(port).await, b"second");
    }

    #[tokio::test]
    /// Exposing twice is harmless: the newer connection takes the port, and the older
    /// stream closing later does not detach it.
    async fn a_second_expose_takes_over_and_the_first_closing_does_not_detach_it() {
        let exposed = Arc::new(Exposed::default());
        let port = free_port();
        let (_a, s1) = connection(&exposed, port, b"a").await;
        assert_eq!(get(port).await, b"a");
        let (_b, _s2) = connection(&exposed, port, b"b").await;
        assert_eq!(get(port).await, b"b");
        drop(s1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(get(port).await, b"b");
    }

    #[tokio::test]
    /// The caller's first bytes go out with the open: ktctl's side sees them before it has
    /// replied (waiting for the reply first cost every new connection a tunnel round trip).
    /// A refusal after them still resets the caller.
    async fn a_callers_bytes_go_out_with_the_open_and_a_refusal_resets_it() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (_client, mut inbound) = Mux::start(a, tunnel::Mode::Client);
        let (agent, _opened) = Mux::start(b, tunnel::Mode::Server);
        tokio::spawn(async move {
            let mut first = true;
            while let Some(mut s) = inbound.recv().await {
                let _ = tunnel::read_frame(&mut s, 4096).await;
                let mut hello = [0u8; 5];
                let _ = s.read_exact(&mut hello).await;
                if std::mem::take(&mut first) {
                    let _ = write_frame(&mut s, &Frame::Reply(None)).await;
                    let _ = s.write_all(&hello).await;
                    let _ = s.shutdown().await;
                } else {
                    tunnel::refuse(s, ErrorCode::Denied, "local port closed").await;
                }
            }
        });
        let exposed = Exposed::default();
        let port = free_port();
        exposed.listen(port).await.expect("listen");
        let tx = exposed.ports.lock().expect("ports").get(&port).cloned();
        tx.expect("listening").send_replace(Some((1, agent)));

        let call = || async {
            let mut c = TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect");
            c.write_all(b"hello").await.expect("write");
            let mut out = vec![];
            let r = c.read_to_end(&mut out).await;
            r.map(|_| out)
        };
        let got = tokio::time::timeout(Duration::from_secs(5), call())
            .await
            .expect("the caller's bytes waited for the reply");
        assert_eq!(got.expect("read"), b"hello");
        let refused = tokio::time::timeout(Duration::from_secs(5), call()).await;
        let refused = refused.expect("refused in time");
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "{refused:?}"
        );
    }
}
