//! The proxy against in-process upstreams: a default one on 127.0.0.1 and a developer's on
//! 127.0.0.2, on the same port as in the cluster.

use std::net::SocketAddr;

use futures::stream;
use http::header::HeaderName;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::mesh::routes::tests::route;

/// What an upstream answers: its name and what it saw of the request.
async fn answer(
    mut req: Request<Incoming>,
    name: &'static str,
) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
    if req.headers().contains_key(UPGRADE) {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let mut io = TokioIo::new(on.await.expect("upgraded"));
            io.write_all(format!("{name}:").as_bytes())
                .await
                .expect("write");
            let mut buf = [0u8; 64];
            while let Ok(n @ 1..) = io.read(&mut buf).await {
                io.write_all(&buf[..n]).await.expect("echo");
            }
        });
        let r = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(CONNECTION, "upgrade")
            .header(UPGRADE, "echo")
            .body(Empty::new().boxed())
            .expect("response");
        return Ok(r);
    }
    if req.uri().path() == "/grpc" {
        let body = req.into_body().collect().await.expect("request body");
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let frames = stream::iter([
            Ok::<_, Infallible>(Frame::data(Bytes::from(format!("{name}:")))),
            Ok(Frame::data(body.to_bytes())),
            Ok(Frame::trailers(trailers)),
        ]);
        let r = Response::builder()
            .header(CONTENT_TYPE, "application/grpc")
            .body(StreamBody::new(frames).boxed())
            .expect("response");
        return Ok(r);
    }
    let seen = |h: &str| {
        req.headers()
            .get(h)
            .map(|v| v.to_str().expect("ascii").to_string())
    };
    let text = format!(
        "{name} {:?} host={:?} authority={:?} te={:?} private={:?} keep-alive={:?}",
        req.version(),
        seen("host"),
        req.uri().authority().map(|a| a.to_string()),
        seen("te"),
        seen("x-private"),
        seen("keep-alive"),
    );
    Ok(Response::new(Full::new(Bytes::from(text)).boxed()))
}

async fn http_upstream(listener: TcpListener, name: &'static str) {
    loop {
        let (c, _) = listener.accept().await.expect("accept");
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| answer(req, name));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(c), service)
                .await;
        });
    }
}

/// Two listeners on the same port: 127.0.0.1 (the default) and 127.0.0.2 (a developer).
async fn two_listeners() -> (TcpListener, TcpListener) {
    for _ in 0..20 {
        let default = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = default.local_addr().expect("addr").port();
        if let Ok(dev) = TcpListener::bind(("127.0.0.2", port)).await {
            return (default, dev);
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

/// A router whose default is 127.0.0.1 and whose routes are `routes`, forwarding to `port`.
async fn router(routes: Vec<Route>, port: u16) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let table = Arc::new(Routes::default());
    table.set(routes);
    let default = Host::parse("127.0.0.1").expect("host");
    tokio::spawn(serve(listener, table, port, fixed(default, port), None));
    addr
}

use super::super::routes::Route;

/// Upstreams "default" and "dev" and a router sending `version: abcde` to "dev".
async fn mesh() -> SocketAddr {
    let (default, dev) = two_listeners().await;
    let port = default.local_addr().expect("addr").port();
    tokio::spawn(http_upstream(default, "default"));
    tokio::spawn(http_upstream(dev, "dev"));
    router(vec![route("VERSION", "abcde", "127.0.0.2")], port).await
}

async fn text(resp: Response<Incoming>) -> String {
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8(body.to_vec()).expect("utf-8")
}

#[tokio::test]
async fn http1_requests_on_one_connection_are_routed_one_by_one() {
    let router = mesh().await;
    let tcp = TcpStream::connect(router).await.expect("connect");
    let (mut client, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    let conn = tokio::spawn(conn);
    let cases: [(&[(&str, &str)], &str); 5] = [
        (&[("version", "abcde")], "dev"),
        (&[], "default"),
        (&[("VeRsIoN", "abcde")], "dev"),
        (&[("version", "other")], "default"),
        (&[("x-version", "abcde")], "default"),
    ];
    for (headers, expected) in cases {
        let mut req = Request::builder()
            .uri("/path?q=1")
            .header(HOST, "nginx.default.svc:80");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Empty::<Bytes>::new()).expect("request");
        client.ready().await.expect("the one connection stays open");
        let resp = client.send_request(req).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        let got = text(resp).await;
        assert!(
            got.starts_with(&format!("{expected} ")),
            "{headers:?}: {got}"
        );
        assert!(
            got.contains(r#"host=Some("nginx.default.svc:80")"#),
            "Host changed: {got}"
        );
        assert!(got.contains("HTTP/1.1"), "{got}");
    }
    assert!(!conn.is_finished(), "still one connection");
}

#[tokio::test]
async fn hop_by_hop_headers_stop_at_the_router_but_te_trailers_goes_on() {
    let router = mesh().await;
    let tcp = TcpStream::connect(router).await.expect("connect");
    let (mut client, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("/")
        .header(HOST, "nginx")
        .header(CONNECTION, "keep-alive, x-private")
        .header("x-private", "1")
        .header("keep-alive", "timeout=5")
        .header(TE, "trailers")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let got = text(client.send_request(req).await.expect("response")).await;
    assert!(got.contains("private=None"), "{got}");
    assert!(got.contains("keep-alive=None"), "{got}");
    assert!(got.contains(r#"te=Some("trailers")"#), "{got}");
}

#[tokio::test]
async fn http2_requests_on_one_connection_are_routed_one_by_one_keeping_the_authority() {
    let router = mesh().await;
    let tcp = TcpStream::connect(router).await.expect("connect");
    let (mut client, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("handshake");
    let conn = tokio::spawn(conn);
    for (header, expected) in [
        (Some(("version", "abcde")), "dev"),
        (None, "default"),
        (Some(("Version", "abcde")), "dev"),
        (Some(("version", "ABCDE")), "default"),
    ] {
        let mut req = Request::builder().uri("http://nginx.default.svc/x");
        if let Some((k, v)) = header {
            req = req.header(k, v);
        }
        let req = req.body(Empty::<Bytes>::new()).expect("request");
        client.ready().await.expect("the one connection stays open");
        let resp = client.send_request(req).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        let got = text(resp).await;
        assert!(
            got.starts_with(&format!("{expected} HTTP/2.0")),
            "{header:?}: {got}"
        );
        assert!(
            got.contains(r#"authority=Some("nginx.default.svc")"#),
            ":authority changed: {got}"
        );
    }
    assert!(!conn.is_finished(), "still one connection");
}

/// An upstream that ends each connection after one request (GOAWAY), as servers with a
/// maximum connection age do.
async fn one_request_per_connection(listener: TcpListener, name: &'static str) {
    loop {
        let (c, _) = listener.accept().await.expect("accept");
        tokio::spawn(async move {
            let (served, mut was_served) = tokio::sync::mpsc::channel::<()>(1);
            let service = hyper::service::service_fn(move |req| {
                let _ = served.try_send(());
                answer(req, name)
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(c), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = was_served.recv() => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        });
    }
}

#[tokio::test]
async fn http2_requests_survive_an_upstream_that_closes_its_connections() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = upstream.local_addr().expect("addr").port();
    tokio::spawn(one_request_per_connection(upstream, "default"));
    let router = router(vec![], port).await;
    let tcp = TcpStream::connect(router).await.expect("connect");
    let (mut client, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    for i in 0..20 {
        let req = Request::builder()
            .uri("http://nginx/")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let resp = client.send_request(req).await.expect("response");
        assert_eq!(
            resp.status(),
            StatusCode::OK,
            "request {i}: {}",
            text(resp).await
        );
        text(resp).await;
    }
}

#[tokio::test]
async fn a_grpc_response_reaches_the_client_with_its_trailers() {
    let router = mesh().await;
    let tcp = TcpStream::connect(router).await.expect("connect");
    let (mut client, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    for (value, expected) in [("abcde", "dev"), ("zzz", "default")] {
        let req = Request::builder()
            .method("POST")
            .uri("http://greeter.default.svc:50051/grpc")
            .header(CONTENT_TYPE, "application/grpc")
            .header(TE, "trailers")
            .header("version", value)
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02hi")))
            .expect("request");
        let resp = client.send_request(req).await.expect("response");
        assert_eq!(
            resp.headers().get(CONTENT_TYPE).map(|v| v.as_bytes()),
            Some(&b"application/grpc"[..])
        );
        let body = resp.into_body().collect().await.expect("body");
        let trailers = body.trailers().cloned();
        assert_eq!(
            body.to_bytes(),
            Bytes::from(format!("{expected}:\0\0\0\0\x02hi"))
        );
        assert_eq!(
            trailers.as_ref().and_then(|t| t.get("grpc-status")),
            Some(&HeaderValue::from_static("0")),
            "the trailer was lost"
        );
    }
}

#[tokio::test]
async fn a_websocket_upgrade_becomes_a_tunnel_to_the_matching_upstream() {
    let router = mesh().await;
    for (value, expected) in [("abcde", "dev"), ("zzz", "default")] {
        let tcp = TcpStream::connect(router).await.expect("connect");
        let (mut client, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("handshake");
        tokio::spawn(conn.with_upgrades());
        let req = Request::builder()
            .uri("/ws")
            .header(HOST, "nginx")
            .header(CONNECTION, "Upgrade")
            .header(UPGRADE, "echo")
            .header("version", value)
            .body(Empty::<Bytes>::new())
            .expect("request");
        let resp = client.send_request(req).await.expect("response");
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        let mut io = TokioIo::new(hyper::upgrade::on(resp).await.expect("upgraded"));
        io.write_all(b"ping").await.expect("write");
        let want = format!("{expected}:ping");
        let mut got = vec![0u8; want.len()];
        tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut got))
            .await
            .expect("echo in time")
            .expect("read");
        assert_eq!(String::from_utf8_lossy(&got), want);
    }
}

#[tokio::test]
async fn bytes_that_are_not_http_reach_the_default_upstream_untouched_both_ways() {
    let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = echo.local_addr().expect("addr").port();
    tokio::spawn(async move {
        loop {
            let (mut c, _) = echo.accept().await.expect("accept");
            tokio::spawn(async move {
                let (mut r, mut w) = c.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let router = router(vec![route("VERSION", "abcde", "127.0.0.2")], port).await;
    let mut c = TcpStream::connect(router).await.expect("connect");
    let mut payload = b"\x00\x01binary".to_vec();
    payload.extend((0..=255u8).cycle().take(100_000));
    let (mut r, mut w) = c.split();
    let send = async {
        w.write_all(&payload).await.expect("write");
        w.shutdown().await.expect("shutdown");
    };
    let mut back = vec![];
    let (_, read) = tokio::join!(send, r.read_to_end(&mut back));
    read.expect("read");
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "the bytes changed");
}

#[tokio::test]
async fn a_protocol_where_the_server_speaks_first_reaches_the_default_upstream() {
    let server = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = server.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let (mut c, _) = server.accept().await.expect("accept");
        c.write_all(b"220 mail ready\r\n").await.expect("banner");
        let mut buf = [0u8; 6];
        c.read_exact(&mut buf).await.expect("read");
        c.write_all(&buf).await.expect("echo");
    });
    let router = router(vec![], port).await;
    let mut c = TcpStream::connect(router).await.expect("connect");
    let mut banner = [0u8; 16];
    tokio::time::timeout(SNIFF_WAIT * 3, c.read_exact(&mut banner))
        .await
        .expect("the banner in time")
        .expect("read");
    assert_eq!(&banner, b"220 mail ready\r\n");
    // Now a line that looks like HTTP goes through raw too.
    c.write_all(b"GET x\n").await.expect("write");
    let mut echo = [0u8; 6];
    c.read_exact(&mut echo).await.expect("read");
    assert_eq!(&echo, b"GET x\n");
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_naming_it() {
    let gone = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = gone.local_addr().expect("addr").port();
    drop(gone);
    let router = router(vec![], port).await;
    let tcp = TcpStream::connect(router).await.expect("connect");
    let (mut client, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("/")
        .header(HOST, "nginx")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = client.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let got = text(resp).await;
    assert!(got.contains(&format!("127.0.0.1:{port}")), "{got}");
    assert!(got.contains("refused"), "{got}");
}

#[test]
fn the_first_bytes_tell_http_from_the_rest() {
    for http in [
        &b"GET / HTTP/1.1\r\n"[..],
        b"POST ",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"MKCALENDAR ",
        b"VERSION-CONTROL /x",
    ] {
        assert_eq!(
            classify(http),
            Some(Sniffed::Http),
            "{}",
            String::from_utf8_lossy(http)
        );
    }
    for other in [
        &b"\x00\x01binary"[..],
        b"\x16\x03\x01\x02\x00",
        b"get / HTTP/1.1",
        b" GET",
        b"-X ",
        b"SSH-2.0-OpenSSH",
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZ ",
    ] {
        assert_eq!(
            classify(other),
            Some(Sniffed::Other),
            "{}",
            String::from_utf8_lossy(other)
        );
    }
    for partial in [&b""[..], b"G", b"GE", b"OPTIONS", b"PR"] {
        assert_eq!(classify(partial), None);
    }
}

#[test]
fn strip_keeps_what_an_upgrade_needs() {
    let mut h = HeaderMap::new();
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade, x-hop"));
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        HeaderName::from_static("x-hop"),
        HeaderValue::from_static("1"),
    );
    h.insert(TE, HeaderValue::from_static("gzip"));
    assert!(wants_upgrade(&h));
    strip_hop_by_hop(&mut h, true);
    assert_eq!(h.get(UPGRADE), Some(&HeaderValue::from_static("websocket")));
    assert_eq!(
        h.get(CONNECTION),
        Some(&HeaderValue::from_static("upgrade"))
    );
    assert!(!h.contains_key("x-hop"));
    assert!(!h.contains_key(TE), "TE other than trailers");
}

/// One HTTP/1.1 request from source address `from`, its whole answer (empty if the router
/// closed the connection).
async fn get_from(router: SocketAddr, from: &str, headers: &str) -> String {
    let sock = TcpSocket::new_v4().expect("socket");
    sock.bind(format!("{from}:0").parse().expect("addr"))
        .expect("bind");
    let mut c = sock.connect(router).await.expect("connect");
    let req = format!("GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n{headers}\r\n");
    c.write_all(req.as_bytes()).await.expect("write");
    let mut out = String::new();
    let _ = c.read_to_string(&mut out).await;
    out
}

#[tokio::test]
async fn each_connection_gets_its_own_default_and_routes_go_to_the_route_port() {
    let (a, b, dev) = (
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        TcpListener::bind("127.0.0.2:0").await.expect("bind"),
    );
    let [pa, pb, pdev] = [&a, &b, &dev].map(|l| l.local_addr().expect("addr").port());
    tokio::spawn(http_upstream(a, "a"));
    tokio::spawn(http_upstream(b, "b"));
    tokio::spawn(http_upstream(dev, "dev"));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let router = listener.local_addr().expect("addr");
    let table = Arc::new(Routes::default());
    table.set(vec![route("version", "abcde", "127.0.0.2")]);
    let local = Host::parse("127.0.0.1").expect("host");
    // As the node's mesh proxies do: the default follows the caller.
    let default: DefaultOf =
        Arc::new(
            move |peer: SocketAddr| match peer.ip().to_string().as_str() {
                "127.0.0.3" => Some(Upstream {
                    host: local.clone(),
                    port: pa,
                }),
                "127.0.0.4" => Some(Upstream {
                    host: local.clone(),
                    port: pb,
                }),
                _ => None,
            },
        );
    tokio::spawn(serve(listener, table, pdev, default, None));

    let body = |s: String| s.rsplit("\r\n\r\n").next().unwrap_or_default().to_string();
    assert!(body(get_from(router, "127.0.0.3", "").await).starts_with("a "));
    assert!(body(get_from(router, "127.0.0.4", "").await).starts_with("b "));
    let routed = get_from(router, "127.0.0.4", "version: abcde\r\n").await;
    assert!(body(routed.clone()).starts_with("dev "), "{routed}");
    // No default for this caller: closed without an answer.
    assert_eq!(get_from(router, "127.0.0.5", "").await, "");
}
