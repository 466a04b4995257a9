//! ktctl's DNS server (hickory-server). The hooks send DNS for each known resolver R to
//! 127.127.53.<slot of R>:53 (UDP and TCP), where a server whose upstream is R answers:
//! Service names from the watch ([`index`]), other cluster names through the shadow (which asks
//! the cluster's DNS), everything else unchanged from R. Name rules: [`names`].

pub mod index;
pub mod names;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{
    Edns, Header, HeaderCounts, Message, Metadata, Query, ResponseCode,
};
use hickory_server::proto::rr::rdata::{A, AAAA, CNAME};
use hickory_server::proto::rr::{Name as DnsName, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use kt_common::bpf::KT_SELF_MARK;
use kt_common::tunnel::{read_data, write_data, write_frame};
use kt_common::wire::{Frame, Open};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use self::index::{Answer, Index, Lookup};
use self::names::{Name, Rules};
use crate::tunnel::Tunnel;

/// How long to wait for an upstream or the cluster's DNS.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(4);
/// Most relayed answers kept.
const CACHE_SIZE: usize = 4096;

/// What every per-resolver server shares.
pub struct Shared {
    pub rules: Rules,
    pub index: Index,
    pub tunnel: Tunnel,
    /// TTL of answers ktctl makes, and the longest a relayed answer is cached (--dnsCacheTtl).
    pub ttl: Duration,
    cache: Mutex<HashMap<(String, RecordType), (Message, Instant)>>,
}

impl Shared {
    pub fn new(rules: Rules, index: Index, tunnel: Tunnel, ttl: Duration) -> Arc<Shared> {
        Arc::new(Shared {
            rules,
            index,
            tunnel,
            ttl,
            cache: Mutex::default(),
        })
    }
}

/// The server for one resolver.
struct Handler {
    shared: Arc<Shared>,
    upstream: SocketAddr,
}

/// Binds 127.127.53.<slot>:53 (UDP and TCP) and serves it; the returned server stops when
/// dropped.
pub fn serve(
    listen: Ipv4Addr,
    upstream: Ipv4Addr,
    shared: Arc<Shared>,
) -> std::io::Result<hickory_server::Server<impl RequestHandler>> {
    let addr = SocketAddr::from((listen, kt_common::bpf::DNS_PORT));
    let udp = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    udp.set_reuse_address(true)?;
    udp.bind(&addr.into())?;
    udp.set_nonblocking(true)?;
    let tcp = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    tcp.set_reuse_address(true)?;
    tcp.bind(&addr.into())?;
    tcp.listen(256)?;
    tcp.set_nonblocking(true)?;
    let mut server = hickory_server::Server::new(Handler {
        shared,
        upstream: SocketAddr::from((upstream, 53)),
    });
    server.register_socket(tokio::net::UdpSocket::from_std(udp.into())?);
    server.register_listener(
        tokio::net::TcpListener::from_std(tcp.into())?,
        Duration::from_secs(10),
        64,
    );
    Ok(server)
}

fn servfail(req: &Request) -> ResponseInfo {
    let mut m = Metadata::response_from_request(&req.metadata);
    m.response_code = ResponseCode::ServFail;
    ResponseInfo::from(Header {
        metadata: m,
        counts: HeaderCounts::default(),
    })
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        req: &Request,
        mut rh: R,
    ) -> ResponseInfo {
        let Some(q) = req.queries.queries().first() else {
            let r = MessageResponseBuilder::from_message_request(req)
                .error_msg(&req.metadata, ResponseCode::FormErr);
            return rh.send_response(r).await.unwrap_or_else(|_| servfail(req));
        };
        let qname = DnsName::from(q.name());
        let qtype = q.query_type();
        let qstr = qname.to_ascii();
        let s = &self.shared;
        let in_domain = qstr
            .trim_end_matches('.')
            .to_ascii_lowercase()
            .ends_with(s.rules.cluster_domain.trim_matches('.'));
        let classified = s.rules.classify(&qstr, |ns| s.index.is_namespace(ns));
        // --ingressIp: an Ingress's host, whatever domain it is in.
        let ingress = s.index.ingress(&qstr);
        let decision = match classified {
            _ if ingress.is_some() => {
                Decision::Answer(Answer::Addresses(ingress.into_iter().collect()))
            }
            Name::Service { name, namespace } => match s.index.service(&name, &namespace) {
                Lookup::Found(a) => Decision::Answer(a),
                Lookup::Missing if !in_domain => Decision::Upstream,
                Lookup::Missing | Lookup::Unknown => {
                    Decision::Relay(s.rules.service_fqdn(&name, &namespace))
                }
            },
            Name::Endpoint {
                hostname,
                service,
                namespace,
            } => match s.index.endpoint(&hostname, &service, &namespace) {
                Lookup::Found(a) => Decision::Answer(a),
                Lookup::Missing if !in_domain => Decision::Upstream,
                _ => Decision::Relay(format!(
                    "{hostname}.{}",
                    s.rules.service_fqdn(&service, &namespace)
                )),
            },
            Name::Cluster { fqdn } => Decision::Relay(fqdn),
            Name::Upstream => Decision::Upstream,
        };
        // --dnsMode podDNS: the cluster's DNS answers every name.
        let decision = match decision {
            Decision::Upstream if s.rules.pod_dns => {
                Decision::Relay(format!("{}.", qstr.trim_end_matches('.')))
            }
            d => d,
        };
        tracing::debug!(name = %qstr, ?qtype, ?decision, "dns query");
        let result = match decision {
            Decision::Answer(a)
                if matches!(
                    qtype,
                    RecordType::A | RecordType::AAAA | RecordType::ANY | RecordType::CNAME
                ) =>
            {
                Ok(self.synthesize(&qname, qtype, a))
            }
            // SRV, TXT... of a Service: the cluster's DNS has them.
            Decision::Answer(_) => {
                self.relay(&qname, qtype, &s.rules.service_fqdn_of(&qstr))
                    .await
            }
            Decision::Relay(fqdn) => self.relay(&qname, qtype, &fqdn).await,
            Decision::Upstream => self.upstream(req).await,
        };
        let msg = match result {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(name = %qstr, error = %e, "dns: answering SERVFAIL");
                let r = MessageResponseBuilder::from_message_request(req)
                    .error_msg(&req.metadata, ResponseCode::ServFail);
                return rh.send_response(r).await.unwrap_or_else(|_| servfail(req));
            }
        };
        let mut meta = msg.metadata;
        meta.id = req.metadata.id;
        meta.recursion_desired = req.metadata.recursion_desired;
        let mut edns = Edns::new();
        edns.set_max_payload(req.max_payload().max(512));
        let mut b = MessageResponseBuilder::from_message_request(req);
        if req.edns.is_some() {
            b.edns(&edns);
        }
        let resp = b.build(
            meta,
            msg.answers.iter(),
            msg.authorities.iter(),
            [],
            msg.additionals.iter(),
        );
        rh.send_response(resp)
            .await
            .unwrap_or_else(|_| servfail(req))
    }
}

#[derive(Debug)]
enum Decision {
    Answer(Answer),
    Relay(String),
    Upstream,
}

impl Handler {
    /// An answer made from the watch.
    fn synthesize(&self, qname: &DnsName, qtype: RecordType, a: Answer) -> Message {
        let ttl = self.shared.ttl.as_secs() as u32;
        let mut m = Message::query();
        m.metadata.authoritative = true;
        m.metadata.recursion_available = true;
        match a {
            Answer::Addresses(ips) => {
                for ip in ips {
                    match (ip, qtype) {
                        (std::net::IpAddr::V4(v4), RecordType::A | RecordType::ANY) => {
                            m.add_answer(Record::from_rdata(qname.clone(), ttl, RData::A(A(v4))))
                        }
                        (std::net::IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => m
                            .add_answer(Record::from_rdata(
                                qname.clone(),
                                ttl,
                                RData::AAAA(AAAA(v6)),
                            )),
                        _ => &mut m,
                    };
                }
            }
            Answer::Alias(target) => {
                if let Ok(t) = DnsName::from_str(&format!("{}.", target.trim_end_matches('.'))) {
                    m.add_answer(Record::from_rdata(
                        qname.clone(),
                        ttl,
                        RData::CNAME(CNAME(t)),
                    ));
                }
            }
        }
        m
    }

    /// Asks the cluster's DNS (through the shadow) for `fqdn`, and answers under `qname`.
    async fn relay(
        &self,
        qname: &DnsName,
        qtype: RecordType,
        fqdn: &str,
    ) -> Result<Message, String> {
        let key = (fqdn.to_ascii_lowercase(), qtype);
        if let Some((m, until)) = self
            .shared
            .cache
            .lock()
            .expect("dns cache")
            .get(&key)
            .cloned()
            && until > Instant::now()
        {
            return Ok(rename(m, fqdn, qname));
        }
        let target = DnsName::from_str(fqdn).map_err(|e| e.to_string())?;
        let mut query = Message::query();
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(target, qtype));
        let bytes = query.to_vec().map_err(|e| e.to_string())?;
        let ask = async {
            let mut st = self
                .shared
                .tunnel
                .stream()
                .await
                .map_err(|e| e.to_string())?;
            write_frame(&mut st, &Frame::Open(Open::Dns))
                .await
                .map_err(|e| e.to_string())?;
            write_data(&mut st, &bytes)
                .await
                .map_err(|e| e.to_string())?;
            kt_common::tunnel::expect_ok(&mut st)
                .await
                .map_err(|e| e.to_string())?;
            read_data(&mut st)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "the shadow closed the DNS stream".to_string())
        };
        let answer = tokio::time::timeout(UPSTREAM_TIMEOUT, ask)
            .await
            .map_err(|_| "the cluster's DNS did not answer".to_string())??;
        let m = Message::from_vec(&answer).map_err(|e| e.to_string())?;
        let ttl = m
            .answers
            .iter()
            .map(|r| r.ttl)
            .min()
            .unwrap_or(5)
            .min(self.shared.ttl.as_secs() as u32);
        let mut cache = self.shared.cache.lock().expect("dns cache");
        if cache.len() >= CACHE_SIZE {
            let now = Instant::now();
            cache.retain(|_, (_, until)| *until > now);
            if cache.len() >= CACHE_SIZE {
                cache.clear();
            }
        }
        cache.insert(
            key,
            (
                m.clone(),
                Instant::now() + Duration::from_secs(u64::from(ttl)),
            ),
        );
        drop(cache);
        Ok(rename(m, fqdn, qname))
    }

    /// Sends the query unchanged to the resolver the application asked, over the protocol
    /// it used.
    async fn upstream(&self, req: &Request) -> Result<Message, String> {
        let raw = req.as_slice();
        let bytes = if req.protocol().is_stream() {
            tokio::time::timeout(UPSTREAM_TIMEOUT, tcp_exchange(self.upstream, raw))
                .await
                .map_err(|_| "upstream timeout".to_string())?
        } else {
            udp_exchange(self.upstream, raw).await
        }
        .map_err(|e| format!("upstream {}: {e}", self.upstream))?;
        Message::from_vec(&bytes).map_err(|e| e.to_string())
    }
}

impl Rules {
    /// The cluster FQDN behind a short Service name (for record types the watch cannot answer).
    fn service_fqdn_of(&self, qname: &str) -> String {
        match self.classify(qname, |_| true) {
            Name::Service { name, namespace } => self.service_fqdn(&name, &namespace),
            _ => qname.to_string(),
        }
    }
}

/// Renames records owned by `from` to `to` (the name the application asked).
fn rename(mut m: Message, from: &str, to: &DnsName) -> Message {
    let Ok(from) = DnsName::from_str(from) else {
        return m;
    };
    if &from == to {
        return m;
    }
    for r in m.answers.iter_mut() {
        if r.name.eq_ignore_root(&from) {
            r.name = to.clone();
        }
    }
    m
}

/// A socket of ktctl's own for an upstream resolver: marked [`KT_SELF_MARK`] before it
/// connects, so that the hooks leave it alone (else the query would loop back into ktctl).
fn upstream_socket(upstream: SocketAddr, ty: socket2::Type) -> std::io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::for_address(upstream), ty, None)?;
    s.set_mark(KT_SELF_MARK)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

async fn udp_exchange(upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let sock = upstream_socket(upstream, socket2::Type::DGRAM)?;
    let sock = tokio::net::UdpSocket::from_std(sock.into())?;
    sock.connect(upstream).await?;
    let mut buf = vec![0u8; 65_535];
    for _ in 0..2 {
        sock.send(query).await?;
        let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT / 2;
        // A reply with another ID or question (late, for an earlier query, or spoofed) is
        // dropped, and the wait goes on, as a stub resolver's would.
        while let Ok(r) = tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            let n = r?;
            if kt_common::dnsmsg::reply_matches(query, &buf[..n]) {
                buf.truncate(n);
                return Ok(buf);
            }
            tracing::debug!(%upstream, len = n, "dropping a DNS reply that does not match its query");
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "no answer",
    ))
}

async fn tcp_exchange(upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let sock = upstream_socket(upstream, socket2::Type::STREAM)?;
    let mut s = tokio::net::TcpSocket::from_std_stream(sock.into())
        .connect(upstream)
        .await?;
    let mut out = Vec::with_capacity(query.len() + 2);
    out.extend_from_slice(&(query.len() as u16).to_be_bytes());
    out.extend_from_slice(query);
    s.write_all(&out).await?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await?;
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

/// The host's resolvers (IPv4 nameservers) and search domains, from resolv.conf text.
pub fn host_config(resolv_conf: &str) -> (Vec<Ipv4Addr>, Vec<String>) {
    let mut servers = vec![];
    let mut search = vec![];
    for line in resolv_conf.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                if let Some(ip) = words.next().and_then(|w| w.parse::<Ipv4Addr>().ok())
                    && !servers.contains(&ip)
                {
                    servers.push(ip);
                }
            }
            Some("search") | Some("domain") => {
                search = words.map(|w| w.trim_end_matches('.').to_string()).collect()
            }
            _ => {}
        }
    }
    (servers, search)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_is_read_like_glibc_does() {
        let (servers, search) = host_config(
            "# generated\nnameserver 127.0.0.53\nnameserver 127.0.0.53\nnameserver fd00::1\noptions edns0 trust-ad\nsearch lan corp.example.com.\n; comment\n",
        );
        assert_eq!(servers, vec![Ipv4Addr::new(127, 0, 0, 53)]);
        assert_eq!(
            search,
            vec!["lan".to_string(), "corp.example.com".to_string()]
        );
        assert_eq!(
            host_config("domain home\nsearch lan\n").1,
            vec!["lan".to_string()]
        );
        assert_eq!(host_config(""), (vec![], vec![]));
    }

    /// Regression: the first datagram from the resolver's address was taken as the answer,
    /// whatever its ID.
    #[tokio::test]
    async fn udp_exchange_drops_a_spoofed_reply_and_returns_the_right_one() {
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind the resolver");
        let upstream = server.local_addr().expect("its address");
        let mut q = Message::query();
        q.metadata.id = 0x4b54;
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(
            DnsName::from_str("nginx.example.").expect("a name"),
            RecordType::A,
        ));
        let query = q.to_vec().expect("encode");
        let mut right = query.clone();
        right[2] |= 0x80;
        right.extend_from_slice(b"the answer");
        let mut spoofed = right.clone();
        spoofed[0] ^= 0xff;
        let (sent_right, sent_spoofed) = (right.clone(), spoofed.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (_, client) = server.recv_from(&mut buf).await.expect("the query");
            server.send_to(&sent_spoofed, client).await.expect("spoof");
            server.send_to(&sent_right, client).await.expect("answer");
        });
        let got = udp_exchange(upstream, &query).await.expect("an answer");
        assert_eq!(got, right, "the spoofed reply was taken");
    }
}
