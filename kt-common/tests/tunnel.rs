//! The tunnel over real TLS and real TCP on loopback: handshake, authentication, streams in
//! both directions, bad frames, and many streams at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::FutureExt;
use kt_common::pki::{SessionPki, agent_identity};
use kt_common::tunnel::{
    self, ClientSession, Identity, Mux, MuxStream, ServerInfo, ServerPin, StreamHandler,
    TunnelError, read_frame, write_frame,
};
use kt_common::wire::{ErrorCode, Frame, MAX_CONTROL_FRAME, Open};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SESSION: &str = "t3st";

struct Agent {
    addr: std::net::SocketAddr,
    opens: Arc<AtomicUsize>,
}

/// An agent on loopback that serves echo/source/sink, answers Expose by opening an Inbound
/// stream back, and counts the opens it handled.
async fn agent(pki: &SessionPki) -> Agent {
    agent_with(
        &agent_identity(SESSION, 1).expect("agent identity"),
        &pki.client_ca_pem,
    )
    .await
}

/// An agent with the given credentials.
async fn agent_with(server: &Identity, client_ca_pem: &str) -> Agent {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let opens = Arc::new(AtomicUsize::new(0));
    let counted = opens.clone();
    let handler: StreamHandler = Arc::new(move |mux: Mux, open: Open, s: MuxStream| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move {
            if let Open::Expose { port } = open {
                let mut s = s;
                write_frame(&mut s, &Frame::Reply(None))
                    .await
                    .expect("reply");
                let mut back = mux.open().await.expect("open back");
                let peer = "10.244.1.9:41000".parse().expect("addr");
                write_frame(&mut back, &Frame::Open(Open::Inbound { port, peer }))
                    .await
                    .expect("inbound");
                tunnel::expect_ok(&mut back).await.expect("client accepts");
                back.write_all(b"hello from the cluster")
                    .await
                    .expect("write");
                back.shutdown().await.expect("shutdown");
                return;
            }
            if let Some(s) = tunnel::serve_diagnostic(&open, s).await {
                tunnel::refuse(s, ErrorCode::Unsupported, "not in this test").await;
            }
        }
        .boxed()
    });
    let tls = tunnel::server_tls(server, client_ca_pem).expect("server tls");
    let info = Arc::new(ServerInfo {
        session: SESSION.into(),
        agent: "test agent".into(),
        pod_ip: None,
        dns: None,
        idle: Duration::from_secs(30),
    });
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.expect("accept");
            let (tls, info, handler) = (tls.clone(), info.clone(), handler.clone());
            tokio::spawn(async move {
                let _ = tunnel::serve_connection(tcp, tls, info, handler, ()).await;
            });
        }
    });
    Agent { addr, opens }
}

async fn client(
    addr: std::net::SocketAddr,
    id: &Identity,
    session: &str,
) -> Result<(ClientSession, tokio::sync::mpsc::Receiver<MuxStream>), TunnelError> {
    pinned_client(addr, id, &ServerPin::trust_first(), session).await
}

async fn pinned_client(
    addr: std::net::SocketAddr,
    id: &Identity,
    pin: &ServerPin,
    session: &str,
) -> Result<(ClientSession, tokio::sync::mpsc::Receiver<MuxStream>), TunnelError> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    ClientSession::connect(
        tcp,
        &tunnel::client_tls(id, pin).expect("client tls"),
        session,
        "test client",
        Duration::from_secs(1),
    )
    .await
}

#[tokio::test]
async fn echo_round_trips_over_mutual_tls() {
    let pki = SessionPki::generate(SESSION, 1).expect("pki");
    let a = agent(&pki).await;
    let (s, _) = client(a.addr, &pki.client, SESSION).await.expect("session");
    assert_eq!(s.welcome.agent, "test agent");
    let mut st = s.mux.request(Open::Echo).await.expect("echo");
    st.write_all(b"ping through the tunnel")
        .await
        .expect("write");
    let mut buf = [0u8; 23];
    st.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"ping through the tunnel");
}

#[tokio::test]
async fn a_client_without_the_session_certificate_is_refused_and_nothing_is_served() {
    let pki = SessionPki::generate(SESSION, 1).expect("pki");
    let other = SessionPki::generate("other", 1).expect("pki");
    let a = agent(&pki).await;
    // A certificate from another session's CA: the agent refuses it during the handshake.
    let r = client(a.addr, &other.client, SESSION).await;
    assert!(r.is_err(), "the intruder got a session");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(a.opens.load(Ordering::SeqCst), 0);
    // The rightful client still works.
    let (s, _) = client(a.addr, &pki.client, SESSION).await.expect("session");
    s.mux.request(Open::Echo).await.expect("echo");
}

#[tokio::test]
/// Regression: the agent's key sat in a Secret that any pod of the namespace could mount, so
/// an impostor pod could present it. Now ktctl pins the certificate of its first connection;
/// another agent of the same session, with the same client CA, is refused on reconnect and
/// never sees a stream.
async fn a_client_pinned_to_its_agent_refuses_an_impostor_of_the_same_session() {
    let pki = SessionPki::generate(SESSION, 1).expect("pki");
    let real = agent(&pki).await;
    let impostor = agent(&pki).await;
    let pin = ServerPin::trust_first();
    let (s, _) = pinned_client(real.addr, &pki.client, &pin, SESSION)
        .await
        .expect("the first connection pins the real agent");
    s.mux.request(Open::Echo).await.expect("echo");
    let pinned = pin.pinned().expect("a pinned certificate");
    let err = pinned_client(impostor.addr, &pki.client, &pin, SESSION)
        .await
        .expect_err("the impostor must be refused");
    assert!(matches!(err, TunnelError::Tls(_)), "{err}");
    assert_eq!(pin.pinned(), Some(pinned), "the pin must not move");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(impostor.opens.load(Ordering::SeqCst), 0);
    // A reconnect to the real agent works.
    let (s, _) = pinned_client(real.addr, &pki.client, &pin, SESSION)
        .await
        .expect("reconnect to the pinned agent");
    s.mux.request(Open::Echo).await.expect("echo");
    // A pin told to refuse everything refuses even the real agent.
    pin.refuse_all();
    assert!(
        pinned_client(real.addr, &pki.client, &pin, SESSION)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_wrong_session_id_is_rejected_with_a_reason() {
    let pki = SessionPki::generate(SESSION, 1).expect("pki");
    let a = agent(&pki).await;
    let err = client(a.addr, &pki.client, "s0mething-else")
        .await
        .expect_err("rejected");
    match err {
        TunnelError::Rejected(reason) => assert!(reason.contains(SESSION), "{reason}"),
        other => panic!("expected a rejection, got {other}"),
    }
}

#[tokio::test]
async fn the_agent_can_open_streams_toward_the_client() {
    let pki = SessionPki::generate(SESSION, 1).expect("pki");
    let a = agent(&pki).await;
    let (s, mut inbound) = client(a.addr, &pki.client, SESSION).await.expect("session");
    let _expose = s
        .mux
        .request(Open::Expose { port: 8080 })
        .await
        .expect("expose");
    let mut st = tokio::time::timeout(Duration::from_secs(5), inbound.recv())
        .await
        .expect("in time")
        .expect("a stream");
    match read_frame(&mut st, MAX_CONTROL_FRAME).await.expect("open") {
        Frame::Open(Open::Inbound { port, peer }) => {
            assert_eq!(port, 8080);
            assert_eq!(peer.to_string(), "10.244.1.9:41000");
        }
        other => panic!("unexpected {other:?}"),
    }
    write_frame(&mut st, &Frame::Reply(None))
        .await
        .expect("reply");
    let mut got = String::new();
    st.read_to_string(&mut got).await.expect("read");
    assert_eq!(got, "hello from the cluster");
}

#[tokio::test]
async fn a_malformed_open_fails_only_its_own_stream() {
    let pki = SessionPki::generate(SESSION, 1).expect("pki");
    let a = agent(&pki).await;
    let (s, _) = client(a.addr, &pki.client, SESSION).await.expect("session");
    let mut bad = s.mux.open().await.expect("open");
    // A frame with an unknown open kind.
    bad.write_all(&[0, 0, 0, 2, 16, 99]).await.expect("write");
    match read_frame(&mut bad, MAX_CONTROL_FRAME)
        .await
        .expect("a reply")
    {
        Frame::Reply(Some((ErrorCode::BadRequest, msg))) => {
            assert!(msg.contains("open kind"), "{msg}")
        }
        other => panic!("unexpected {other:?}"),
    }
    // An oversized length prefix.
    let mut huge = s.mux.open().await.expect("open");
    huge.write_all(&u32::MAX.to_be_bytes())
        .await
        .expect("write");
    match read_frame(&mut huge, MAX_CONTROL_FRAME)
        .await
        .expect("a reply")
    {
        Frame::Reply(Some((ErrorCode::BadRequest, msg))) => {
            assert!(msg.contains("over the limit"), "{msg}")
        }
        other => panic!("unexpected {other:?}"),
    }
    let mut ok = s
        .mux
        .request(Open::Echo)
        .await
        .expect("echo after bad frames");
    ok.write_all(b"x").await.expect("write");
    let mut b = [0u8; 1];
    ok.read_exact(&mut b).await.expect("read");
    assert!(!s.mux.is_closed());
}

#[tokio::test]
async fn an_unsupported_open_is_refused_with_its_code() {
    let pki = SessionPki::generate(SESSION, 1).expect("pki");
    let a = agent(&pki).await;
    let (s, _) = client(a.addr, &pki.client, SESSION).await.expect("session");
    let err = s.mux.request(Open::Dns).await.expect_err("refused");
    match err {
        TunnelError::Io(e) => assert_eq!(e.kind(), std::io::ErrorKind::Unsupported),
        other => panic!("unexpected {other}"),
    }
}

#[tokio::test]
/// Regression: with both directions saturated, yamux on a plain socket stopped reading while
/// it owed a Pong it could not write, on both ends at once (hung from 64 streams up).
async fn two_hundred_saturated_echo_streams_neither_deadlock_nor_lose_bytes() {
    let pki = SessionPki::generate(SESSION, 1).expect("pki");
    let a = agent(&pki).await;
    let (s, _) = client(a.addr, &pki.client, SESSION).await.expect("session");
    let mut tasks = vec![];
    for i in 0..200u32 {
        let mux = s.mux.clone();
        tasks.push(tokio::spawn(async move {
            let st = mux.request(Open::Echo).await.expect("echo");
            let (mut r, mut w) = tokio::io::split(st);
            let data: Vec<u8> = (0..256 * 1024u32)
                .map(|j| (j.wrapping_mul(31).wrapping_add(i)) as u8)
                .collect();
            let sent = data.clone();
            let writer = tokio::spawn(async move {
                w.write_all(&sent).await.expect("write");
                w.shutdown().await.expect("shutdown");
            });
            let mut back = Vec::new();
            r.read_to_end(&mut back).await.expect("read");
            writer.await.expect("writer");
            assert_eq!(back.len(), data.len(), "stream {i} lost bytes");
            assert!(back == data, "stream {i} corrupted");
        }));
    }
    for t in tasks {
        t.await.expect("stream task");
    }
}

#[tokio::test]
async fn source_and_sink_count_bytes() {
    let pki = SessionPki::generate(SESSION, 1).expect("pki");
    let a = agent(&pki).await;
    let (s, _) = client(a.addr, &pki.client, SESSION).await.expect("session");
    let mut src = s
        .mux
        .request(Open::Source { bytes: 3_000_000 })
        .await
        .expect("source");
    let mut n = 0usize;
    let mut buf = vec![0u8; 65536];
    loop {
        let r = src.read(&mut buf).await.expect("read");
        if r == 0 {
            break;
        }
        n += r;
    }
    assert_eq!(n, 3_000_000);
    let mut sink = s.mux.request(Open::Sink).await.expect("sink");
    sink.write_all(&vec![7u8; 1_234_567]).await.expect("write");
    sink.shutdown().await.expect("shutdown");
    let mut count = [0u8; 8];
    sink.read_exact(&mut count).await.expect("count");
    assert_eq!(u64::from_be_bytes(count), 1_234_567);
}

#[tokio::test]
async fn a_dead_transport_closes_the_session() {
    let pki = SessionPki::generate(SESSION, 1).expect("pki");
    // A proxy in the middle that we can cut, as a dropped port-forward would be.
    let a = agent(&pki).await;
    let relay = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let relay_addr = relay.local_addr().expect("addr");
    let cut = Arc::new(tokio::sync::Notify::new());
    let cut2 = cut.clone();
    tokio::spawn(async move {
        let (mut inbound, _) = relay.accept().await.expect("accept");
        let mut out = TcpStream::connect(a.addr).await.expect("connect");
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut inbound, &mut out) => {}
            _ = cut2.notified() => {}
        }
    });
    let (s, _) = client(relay_addr, &pki.client, SESSION)
        .await
        .expect("session");
    s.mux
        .request(Open::Echo)
        .await
        .expect("works before the cut");
    cut.notify_one();
    tokio::time::timeout(Duration::from_secs(10), s.mux.closed())
        .await
        .expect("the session notices the cut");
    assert!(s.mux.request(Open::Echo).await.is_err());
}
