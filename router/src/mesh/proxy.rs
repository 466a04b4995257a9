//! The proxy: each accepted connection is sniffed; HTTP/1 and HTTP/2 (prior knowledge, as
//! gRPC speaks it) requests are routed one by one, anything else is spliced to the default
//! upstream untouched.
//!
//! Requests go upstream in the version they came in, streamed both ways (trailers included),
//! with the client's Host and `:authority`: the upstream sees what the client sent, less the
//! hop-by-hop headers of HTTP/1. An HTTP/1 `Upgrade` (a WebSocket) becomes a raw tunnel to the
//! upstream that accepted it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HOST, TE, TRANSFER_ENCODING, UPGRADE};
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::Instant;
use tracing::Instrument;

use super::routes::{Host, Routes};

/// How long a connection to an upstream may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a new connection may stay silent before it is taken for a protocol in which the
/// server speaks first (SMTP, MySQL) and spliced to the default upstream.
pub const SNIFF_WAIT: Duration = Duration::from_secs(1);
/// Longest method token taken for the start of an HTTP/1 request line.
const MAX_METHOD: usize = 20;
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

type Body = Either<Incoming, Full<Bytes>>;

/// Why a request could not be forwarded (the 502's text).
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error(transparent)]
    Client(hyper_util::client::legacy::Error),
    #[error(transparent)]
    Http(hyper::Error),
    #[error("connecting: {0}")]
    Connect(std::io::Error),
    #[error("no connection in {CONNECT_TIMEOUT:?}")]
    ConnectTimeout,
    #[error("request target: {0}")]
    Uri(http::Error),
}

/// An upstream: a host and a port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Upstream {
    pub host: Host,
    pub port: u16,
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// The default upstream of an accepted connection, from its peer's address (`None`: the
/// connection is closed).
pub type DefaultOf = Arc<dyn Fn(SocketAddr) -> Option<Upstream> + Send + Sync>;

/// The same default upstream for every connection.
pub fn fixed(host: Host, port: u16) -> DefaultOf {
    let up = Upstream { host, port };
    Arc::new(move |_| Some(up.clone()))
}

/// Routes the connections `listener` accepts: a request that matches a route goes to the
/// route's target on `route_port`, anything else to the connection's default upstream.
/// Upstream connections carry `mark` (`SO_MARK`) if given. Runs until dropped; no accept
/// error ends it.
pub async fn serve(
    listener: TcpListener,
    routes: Arc<Routes>,
    route_port: u16,
    default: DefaultOf,
    mark: Option<u32>,
) {
    let proxy = Arc::new(Proxy::new(routes, route_port, mark));
    let port = route_port;
    let mut last_log: Option<Instant> = None;
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    last_log = Some(Instant::now());
                    tracing::warn!(port, error = %e, "accept failed; going on");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(up) = default(peer) else {
            tracing::debug!(%peer, port, "no default upstream for this connection; closed");
            continue;
        };
        let proxy = proxy.clone();
        tokio::spawn(
            proxy
                .connection(conn, up)
                .instrument(tracing::info_span!("conn", %peer, port)),
        );
    }
}

struct Proxy {
    routes: Arc<Routes>,
    /// The port a route's target is dialed on.
    route_port: u16,
    mark: Option<u32>,
    server: auto::Builder<TokioExecutor>,
    /// HTTP/1 upstream connections, pooled by upstream.
    h1: Client<Dialer, Incoming>,
    h2: H2Pool,
}

impl Proxy {
    fn new(routes: Arc<Routes>, route_port: u16, mark: Option<u32>) -> Proxy {
        let mut server = auto::Builder::new(TokioExecutor::new());
        server.http1().timer(TokioTimer::new());
        server.http2().timer(TokioTimer::new());
        let h1 = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .build(Dialer { mark });
        Proxy {
            routes,
            route_port,
            mark,
            server,
            h1,
            h2: H2Pool::default(),
        }
    }

    async fn connection(self: Arc<Self>, conn: TcpStream, default: Upstream) {
        let _ = conn.set_nodelay(true);
        match sniff(&conn, SNIFF_WAIT).await {
            Sniffed::Http => {
                let proxy = self.clone();
                let default = Arc::new(default);
                let service = hyper::service::service_fn(move |req| {
                    let proxy = proxy.clone();
                    let default = default.clone();
                    async move { Ok::<_, Infallible>(proxy.forward(req, &default).await) }
                });
                if let Err(e) = self
                    .server
                    .serve_connection_with_upgrades(TokioIo::new(conn), service)
                    .await
                {
                    tracing::debug!(error = %e, "HTTP connection failed");
                }
            }
            Sniffed::Other => self.splice(conn, &default).await,
        }
    }

    async fn forward(&self, req: Request<Incoming>, default: &Upstream) -> Response<Body> {
        let upstream = match self.routes.pick(req.headers()) {
            Some(host) => Upstream {
                host,
                port: self.route_port,
            },
            None => default.clone(),
        };
        tracing::debug!(method = %req.method(), uri = %req.uri(), version = ?req.version(), %upstream, "routing a request");
        let forwarded = if req.version() == Version::HTTP_2 {
            self.http2(req, &upstream).await
        } else {
            self.http1(req, &upstream).await
        };
        match forwarded {
            Ok(resp) => resp.map(Either::Left),
            Err(e) => {
                let text = format!("kt-router: upstream {upstream}: {}", chain(&e));
                tracing::debug!(error = %text, "upstream failed");
                bad_gateway(text)
            }
        }
    }

    async fn http1(
        &self,
        mut req: Request<Incoming>,
        upstream: &Upstream,
    ) -> Result<Response<Incoming>, ForwardError> {
        let upgrade = wants_upgrade(req.headers());
        let client_side = upgrade.then(|| hyper::upgrade::on(&mut req));
        strip_hop_by_hop(req.headers_mut(), upgrade);
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(upstream.to_string())
            .path_and_query(path)
            .build()
            .map_err(ForwardError::Uri)?;
        let mut resp = self.h1.request(req).await.map_err(ForwardError::Client)?;
        let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        if let (true, Some(client_side)) = (switched, client_side) {
            let upstream_side = hyper::upgrade::on(&mut resp);
            tokio::spawn(tunnel(client_side, upstream_side).in_current_span());
        }
        strip_hop_by_hop(resp.headers_mut(), switched);
        Ok(resp)
    }

    /// The request goes on as it came, `:scheme` and `:authority` included: only the
    /// connection is the upstream's.
    async fn http2(
        &self,
        mut req: Request<Incoming>,
        upstream: &Upstream,
    ) -> Result<Response<Incoming>, ForwardError> {
        if req.uri().authority().is_none() {
            // HTTP/2 requires one; a client that sent none named its host, if at all, in Host.
            let authority = req
                .headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
                .unwrap_or_else(|| upstream.to_string());
            let path = req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            *req.uri_mut() = Uri::builder()
                .scheme(req.uri().scheme().cloned().unwrap_or(Scheme::HTTP))
                .authority(authority)
                .path_and_query(path)
                .build()
                .map_err(ForwardError::Uri)?;
        }
        let mut sender = self.h2.get(upstream, self.mark).await?;
        match sender.try_send_request(req).await {
            Ok(resp) => Ok(resp),
            Err(mut e) => match e.take_message() {
                // Not sent: the connection was closing (a GOAWAY, the upstream's idle timeout).
                // Once more on a new one.
                Some(req) => {
                    self.h2.forget(upstream);
                    let mut sender = self.h2.get(upstream, self.mark).await?;
                    sender.send_request(req).await.map_err(ForwardError::Http)
                }
                None => Err(ForwardError::Http(e.into_error())),
            },
        }
    }

    /// A connection that is not HTTP: to the default upstream, byte for byte.
    async fn splice(&self, mut conn: TcpStream, upstream: &Upstream) {
        let mut up = match dial(upstream, self.mark).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(%upstream, error = %e, "cannot reach the default upstream");
                return;
            }
        };
        match tokio::io::copy_bidirectional(&mut conn, &mut up).await {
            Ok((sent, received)) => {
                tracing::debug!(%upstream, sent, received, "raw connection closed")
            }
            Err(e) => tracing::debug!(%upstream, error = %e, "raw connection failed"),
        }
    }
}

/// A TCP connection to `upstream` (its first address), with `mark` if given, in
/// [`CONNECT_TIMEOUT`], without Nagle's delay.
async fn dial(upstream: &Upstream, mark: Option<u32>) -> Result<TcpStream, ForwardError> {
    let connect = async {
        let addr = tokio::net::lookup_host((upstream.host.unbracketed(), upstream.port))
            .await?
            .next()
            .ok_or_else(|| std::io::Error::other("the name has no address"))?;
        let sock = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(m) = mark {
            set_mark(&sock, m)?;
        }
        let tcp = sock.connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| ForwardError::ConnectTimeout)?
        .map_err(ForwardError::Connect)
}

/// `SO_MARK` (needs CAP_NET_ADMIN).
fn set_mark(sock: &TcpSocket, mark: u32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt with a u32 of the length passed, on an open socket.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&raw const mark).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The HTTP/1 client's connector: [`dial`] to the request's authority.
#[derive(Clone)]
struct Dialer {
    mark: Option<u32>,
}

impl tower_service::Service<Uri> for Dialer {
    type Response = TokioIo<TcpStream>;
    type Error = ForwardError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<TokioIo<TcpStream>, ForwardError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), ForwardError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mark = self.mark;
        Box::pin(async move {
            let host = uri.host().unwrap_or_default();
            let host =
                Host::parse(host).map_err(|e| ForwardError::Connect(std::io::Error::other(e)))?;
            let up = Upstream {
                host,
                port: uri.port_u16().unwrap_or(80),
            };
            dial(&up, mark).await.map(TokioIo::new)
        })
    }
}

/// One HTTP/2 connection per upstream, shared by all the requests to it (HTTP/2 multiplexes
/// them). The legacy client's pool is not used for HTTP/2: it takes the `:authority` it sends
/// from the address it connects to, and the client's `:authority` must reach the upstream.
#[derive(Default)]
struct H2Pool {
    conns: Mutex<HashMap<Upstream, http2::SendRequest<Incoming>>>,
}

impl H2Pool {
    async fn get(
        &self,
        upstream: &Upstream,
        mark: Option<u32>,
    ) -> Result<http2::SendRequest<Incoming>, ForwardError> {
        let cached = self
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(upstream)
            .filter(|s| !s.is_closed())
            .cloned();
        if let Some(s) = cached {
            return Ok(s);
        }
        let addr = upstream.to_string();
        let tcp = dial(upstream, mark).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(ForwardError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(upstream = %addr, error = %e, "HTTP/2 upstream connection failed");
            }
        });
        // Two requests may have connected at once: the later connection stays, the other
        // ends with its requests.
        let mut conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        conns.retain(|_, s| !s.is_closed());
        conns.insert(upstream.clone(), sender.clone());
        Ok(sender)
    }

    fn forget(&self, upstream: &Upstream) {
        self.conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(upstream);
    }
}

/// What a connection's first bytes say.
#[derive(Debug, PartialEq, Eq)]
enum Sniffed {
    /// An HTTP/1 request line or the HTTP/2 preface (`PRI * HTTP/2.0`).
    Http,
    /// Anything else, or nothing in time.
    Other,
}

/// Looks at the first bytes without taking them, waiting up to `wait` for enough of them.
async fn sniff(conn: &TcpStream, wait: Duration) -> Sniffed {
    let deadline = Instant::now() + wait;
    let mut head = [0u8; MAX_METHOD + 1];
    loop {
        let n = match tokio::time::timeout_at(deadline, conn.peek(&mut head)).await {
            Ok(Ok(n)) if n > 0 => n,
            // Silent (the server speaks first), closed, or failed.
            _ => return Sniffed::Other,
        };
        if let Some(kind) = classify(&head[..n]) {
            return kind;
        }
        // Too few bytes to tell (a request line split across segments). `peek` would return
        // the same bytes at once, so wait a little for more.
        let next = Instant::now() + Duration::from_millis(5);
        if next >= deadline {
            return Sniffed::Other;
        }
        tokio::time::sleep_until(next).await;
    }
}

/// `None`: too few bytes to tell. A method token (uppercase letters, then `-` or `_` as in
/// WebDAV's) followed by a space is HTTP; the HTTP/2 preface starts with one (`PRI `).
fn classify(head: &[u8]) -> Option<Sniffed> {
    for (i, &b) in head.iter().enumerate() {
        match b {
            b' ' if i > 0 => return Some(Sniffed::Http),
            b'A'..=b'Z' if i < MAX_METHOD => {}
            b'-' | b'_' if i > 0 && i < MAX_METHOD => {}
            _ => return Some(Sniffed::Other),
        }
    }
    None
}

/// A WebSocket-style upgrade: an `Upgrade` header that `Connection` names.
fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE) && tokens(headers, &CONNECTION).any(|t| t == UPGRADE)
}

/// The comma-separated tokens of a header, as header names.
fn tokens<'a>(headers: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = HeaderName> + 'a {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
}

/// Removes the headers that concern one HTTP/1 hop only: Connection and those it names,
/// Keep-Alive, Proxy-Connection, Transfer-Encoding, Upgrade, and TE unless `trailers`.
/// `upgrade` keeps `Upgrade` and `Connection: upgrade`, for a protocol switch.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    if headers.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = tokens(headers, &CONNECTION).collect();
        for name in named {
            if name != TE && !(upgrade && name == UPGRADE) {
                headers.remove(&name);
            }
        }
    }
    for name in [CONNECTION, KEEP_ALIVE, PROXY_CONNECTION, TRANSFER_ENCODING] {
        headers.remove(name);
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(UPGRADE);
    }
    if headers.contains_key(TE) {
        let trailers = headers
            .get_all(TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| {
                t.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
            });
        headers.remove(TE);
        if trailers {
            headers.insert(TE, HeaderValue::from_static("trailers"));
        }
    }
}

/// Once both sides of an upgrade have switched, carries the bytes both ways.
async fn tunnel(client: OnUpgrade, upstream: OnUpgrade) {
    match tokio::try_join!(client, upstream) {
        Ok((client, upstream)) => {
            let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!(error = %e, "upgraded connection failed");
            }
        }
        Err(e) => tracing::debug!(error = %e, "upgrade failed"),
    }
}

fn bad_gateway(text: String) -> Response<Body> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from(text + "\n"))));
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// An error and its sources, each once (hyper's own messages are terse: "client error
/// (Connect)").
fn chain(e: &dyn StdError) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests;
