//! Everything ktctl asks of the Kubernetes API: the client, permissions, the cluster's CIDRs,
//! sessions ([`session`]), the shadow pod ([`shadow`]) and the port-forward
//! to it ([`portforward`]).

pub mod leftovers;
pub mod portforward;
pub mod router;
pub mod session;
pub mod shadow;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::Ipv4Net;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::api::{ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use crate::cidr::widen16;

/// Errors talking to the cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("cannot reach the API server at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: kube::Error,
    },
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{0}")]
    Shadow(String),
    #[error("port-forward to pod {pod}: {reason}")]
    PortForward { pod: String, reason: String },
}

impl ClusterError {
    /// Errors the user fixes in their environment (exit code 2).
    pub fn is_environment(&self) -> bool {
        matches!(
            self,
            ClusterError::Kubeconfig(_) | ClusterError::Forbidden(_)
        )
    }

    pub fn api(what: impl Into<String>, source: kube::Error) -> ClusterError {
        if let kube::Error::Api(s) = &source
            && s.code == 403
        {
            return ClusterError::Forbidden(format!("{}: forbidden: {}", what.into(), s.message));
        }
        ClusterError::Api {
            what: what.into(),
            source,
        }
    }
}

/// Which cluster, as kubectl's flags say.
#[derive(Clone, Debug, Default)]
pub struct Target {
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    pub namespace: Option<String>,
}

/// A connected client and what ktctl needs to know about the cluster's address.
#[derive(Clone)]
pub struct Kube {
    pub client: Client,
    pub namespace: String,
    pub context: String,
    pub server: String,
    /// The API server's addresses: never redirected.
    pub server_ips: Vec<IpAddr>,
}

impl Kube {
    /// Reads the kubeconfig (`--kubeconfig`, else $KUBECONFIG, else ~/.kube/config), picks the
    /// context and namespace, and checks that the API server answers.
    pub async fn connect(t: &Target) -> Result<Kube, ClusterError> {
        let kc = match &t.kubeconfig {
            Some(p) => Kubeconfig::read_from(p)
                .map_err(|e| ClusterError::Kubeconfig(format!("{}: {e}", p.display())))?,
            None => Kubeconfig::read().map_err(|e| {
                ClusterError::Kubeconfig(format!(
                    "{e} (set --kubeconfig or KUBECONFIG, or create ~/.kube/config)"
                ))
            })?,
        };
        let context = t
            .context
            .clone()
            .or_else(|| kc.current_context.clone())
            .unwrap_or_default();
        if let Some(c) = &t.context
            && !kc.contexts.iter().any(|x| &x.name == c)
        {
            let known: Vec<&str> = kc.contexts.iter().map(|x| x.name.as_str()).collect();
            return Err(ClusterError::Kubeconfig(format!(
                "no context {c:?} (contexts: {})",
                known.join(", ")
            )));
        }
        let opts = KubeConfigOptions {
            context: t.context.clone(),
            ..Default::default()
        };
        let mut config = Config::from_custom_kubeconfig(kc, &opts)
            .await
            .map_err(|e| ClusterError::Kubeconfig(e.to_string()))?;
        // As client-go: a dial gives up after 30 s at most; kube's defaults bound reads (295 s,
        // longer than a watch's server-side timeout) and writes. Calls that must not wait that
        // long (renewals, shadow checks) bound themselves.
        config.connect_timeout = Some(Duration::from_secs(10));
        config.read_timeout.get_or_insert(Duration::from_secs(295));
        config.write_timeout.get_or_insert(Duration::from_secs(295));
        let namespace = t
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let server = config.cluster_url.to_string();
        let host = config
            .cluster_url
            .host()
            .unwrap_or_default()
            .trim_matches(['[', ']'])
            .to_string();
        let port = config.cluster_url.port_u16().unwrap_or(443);
        let server_ips = match host.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => tokio::net::lookup_host((host.as_str(), port))
                .await
                .map(|it| it.map(|a| a.ip()).collect())
                .unwrap_or_default(),
        };
        let client = client(config)?;
        client
            .apiserver_version()
            .await
            .map_err(|source| ClusterError::Unreachable {
                url: server.clone(),
                source,
            })?;
        Ok(Kube {
            client,
            namespace,
            context,
            server,
            server_ips,
        })
    }

    /// Fails with the exact verbs and resources missing from `needed` in the namespace.
    pub async fn require(&self, needed: &[Permission]) -> Result<(), ClusterError> {
        self.require_from(needed, "deploy/rbac-connect.yaml").await
    }

    /// [`Kube::require`], naming the manifest whose Role grants `needed`.
    pub async fn require_from(
        &self,
        needed: &[Permission],
        manifest: &str,
    ) -> Result<(), ClusterError> {
        let mut missing = vec![];
        for p in needed {
            if !self.can(p, Some(&self.namespace)).await? {
                missing.push(p.to_string());
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        Err(ClusterError::Forbidden(format!(
            "missing permissions in namespace {}: {} ({manifest} has a Role that grants them)",
            self.namespace,
            missing.join(", ")
        )))
    }

    /// Whether the user may do `p` (in `namespace`, or cluster-wide with None).
    pub async fn can(&self, p: &Permission, namespace: Option<&str>) -> Result<bool, ClusterError> {
        let (resource, sub) = match p.resource.split_once('/') {
            Some((r, s)) => (r, Some(s.to_string())),
            None => (p.resource, None),
        };
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(p.verb.into()),
                    group: Some(p.group.into()),
                    resource: Some(resource.into()),
                    subresource: sub,
                    namespace: namespace.map(Into::into),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let r = Api::<SelfSubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| ClusterError::api("checking permissions (selfsubjectaccessreviews)", e))?;
        Ok(r.status.is_some_and(|s| s.allowed))
    }

    /// The cluster's IPv4 CIDRs: from the ServiceCIDR API and the nodes' pod CIDRs where the
    /// user may read them, else guessed (a /16) from the Services and Pods of the namespace.
    pub async fn cidrs(&self, pod_ips: bool) -> Result<Vec<Ipv4Net>, ClusterError> {
        let mut out = vec![];
        let v4 = |s: &str| s.parse::<Ipv4Net>().ok();
        match Api::<ServiceCIDR>::all(self.client.clone())
            .list(&ListParams::default())
            .await
        {
            Ok(l) if !l.items.is_empty() => {
                for s in l.items {
                    out.extend(
                        s.spec
                            .and_then(|s| s.cidrs)
                            .unwrap_or_default()
                            .iter()
                            .filter_map(|c| v4(c)),
                    );
                }
            }
            other => {
                if let Err(e) = other {
                    tracing::debug!(error = %e, "no ServiceCIDR API; guessing the service CIDR from Services");
                }
                let svcs = Api::<Service>::namespaced(self.client.clone(), &self.namespace)
                    .list(&ListParams::default())
                    .await
                    .map_err(|e| ClusterError::api("listing services", e))?;
                for s in svcs.items {
                    for ip in s.spec.and_then(|s| s.cluster_ips).unwrap_or_default() {
                        if let Ok(ip) = ip.parse::<Ipv4Addr>() {
                            out.push(widen16(ip));
                        }
                    }
                }
                if let Ok(k) = Api::<Service>::namespaced(self.client.clone(), "default")
                    .get("kubernetes")
                    .await
                    && let Some(ip) = k
                        .spec
                        .and_then(|s| s.cluster_ip)
                        .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
                {
                    out.push(widen16(ip));
                }
            }
        }
        if pod_ips {
            let mut found = false;
            if let Ok(nodes) = Api::<Node>::all(self.client.clone())
                .list(&ListParams::default())
                .await
            {
                for n in nodes.items {
                    let spec = n.spec.unwrap_or_default();
                    for c in spec
                        .pod_cidrs
                        .unwrap_or_default()
                        .iter()
                        .chain(spec.pod_cidr.iter())
                    {
                        if let Some(net) = v4(c) {
                            out.push(net);
                            found = true;
                        }
                    }
                }
            }
            if !found {
                tracing::debug!(
                    "no node pod CIDRs visible; guessing them from the namespace's pods"
                );
                let pods = Api::<Pod>::namespaced(self.client.clone(), &self.namespace)
                    .list(&ListParams::default())
                    .await
                    .map_err(|e| ClusterError::api("listing pods", e))?;
                for p in pods.items {
                    if let Some(ip) = p
                        .status
                        .and_then(|s| s.pod_ip)
                        .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
                    {
                        out.push(widen16(ip));
                    }
                }
            }
        }
        Ok(crate::cidr::normalise(out))
    }
}

/// kube's client as kube's own builder makes it (kubeconfig `proxy-url` for http and socks5
/// proxies, the connect/read/write timeouts of [`Config`], auth, extra headers), but with
/// TCP_NODELAY on the API server connection: the tunnel's small writes must not wait for
/// delayed ACKs (kube's connector leaves Nagle on).
fn client(config: Config) -> Result<Client, ClusterError> {
    use hyper_util::client::legacy::connect::proxy::{SocksV5, Tunnel};
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let built = match config.proxy_url.clone() {
        None => finish(config, http),
        Some(proxy) => match proxy.scheme_str() {
            Some("http") => {
                let mut tunnel = Tunnel::new(proxy.clone(), http);
                if let Some(auth) = proxy_auth(&proxy) {
                    tunnel = tunnel.with_auth(auth);
                }
                finish(config, tunnel)
            }
            Some("socks5") | Some("socks5h") => finish(config, SocksV5::new(proxy, http)),
            _ => {
                return Err(ClusterError::Kubeconfig(format!(
                    "proxy-url {proxy}: only http:// and socks5:// proxies are supported"
                )));
            }
        },
    };
    built.map_err(|e| ClusterError::Kubeconfig(e.to_string()))
}

/// `Proxy-Authorization` for a proxy URL with `user:password@`.
fn proxy_auth(proxy: &http::Uri) -> Option<http::HeaderValue> {
    use base64::Engine;
    let userinfo = proxy.authority()?.as_str().rsplit_once('@')?.0;
    let decoded = percent_decode(userinfo);
    http::HeaderValue::from_str(&format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(decoded)
    ))
    .ok()
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(hex) = std::str::from_utf8(&b[i + 1..i + 3])
            && let Ok(v) = u8::from_str_radix(hex, 16)
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn finish<C>(config: Config, connector: C) -> Result<Client, kube::Error>
where
    C: tower::Service<http::Uri> + Clone + Send + Sync + 'static,
    C::Response: hyper_util::client::legacy::connect::Connection
        + hyper::rt::Read
        + hyper::rt::Write
        + Send
        + Unpin
        + 'static,
    C::Future: Send + 'static,
    C::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use kube::client::ConfigExt;
    let https = config.rustls_https_connector_with_connector(connector)?;
    let mut timeouts = hyper_timeout::TimeoutConnector::new(https);
    timeouts.set_connect_timeout(config.connect_timeout);
    timeouts.set_read_timeout(config.read_timeout);
    timeouts.set_write_timeout(config.write_timeout);
    let hyper = hyper_util::client::legacy::Builder::new(hyper_util::rt::TokioExecutor::new())
        .build(timeouts);
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(|e| -> tower::BoxError { Box::new(e) })
        .service(hyper);
    Ok(Client::new(service, config.default_namespace.clone()))
}

/// A permission, as RBAC names it.
#[derive(Clone, Copy, Debug)]
pub struct Permission {
    pub verb: &'static str,
    pub group: &'static str,
    pub resource: &'static str,
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.group.is_empty() {
            write!(f, "{} {}", self.verb, self.resource)
        } else {
            write!(f, "{} {}.{}", self.verb, self.resource, self.group)
        }
    }
}

pub(crate) const fn perm(
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
) -> Permission {
    Permission {
        verb,
        group,
        resource,
    }
}

/// What `ktctl connect` does in its namespace, verb by verb as the code calls the API
/// (deploy/rbac-connect.yaml grants exactly this; a test holds them equal).
pub const CONNECT_PERMISSIONS: &[Permission] = &[
    // The session's anchor: created, renewed (a merge patch), listed and deleted by
    // `clean_expired`, deleted at the end. `get` is never called by ktctl, but the shadow's
    // Role grants get on the Lease, and RBAC lets a user grant only what it holds.
    perm("create", "coordination.k8s.io", "leases"),
    perm("get", "coordination.k8s.io", "leases"),
    perm("list", "coordination.k8s.io", "leases"),
    perm("patch", "coordination.k8s.io", "leases"),
    perm("delete", "coordination.k8s.io", "leases"),
    // The shadow pod: created, read while it starts and before each reconnect, deleted;
    // listed only to guess pod CIDRs when nodes are not readable.
    perm("create", "", "pods"),
    perm("get", "", "pods"),
    perm("list", "", "pods"),
    perm("delete", "", "pods"),
    // The tunnel: kube-rs's port-forward is a websocket, an HTTP GET (verb `get`), and API
    // servers since 1.35 also require `create` for a websocket upgrade to pods/portforward
    // (AuthorizePodWebsocketUpgradeCreatePermission); without it the testbed refuses it.
    perm("get", "", "pods/portforward"),
    perm("create", "", "pods/portforward"),
    // The identity that lets the shadow end its own session.
    perm("create", "", "serviceaccounts"),
    perm("delete", "", "serviceaccounts"),
    perm("create", "rbac.authorization.k8s.io", "roles"),
    perm("delete", "rbac.authorization.k8s.io", "roles"),
    perm("create", "rbac.authorization.k8s.io", "rolebindings"),
    perm("delete", "rbac.authorization.k8s.io", "rolebindings"),
    // A failed shadow's events; names for DNS.
    perm("list", "", "events"),
    perm("list", "", "services"),
    perm("watch", "", "services"),
    perm("list", "discovery.k8s.io", "endpointslices"),
    perm("watch", "discovery.k8s.io", "endpointslices"),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// The `(verb, group, resource)` triples a Role in `yaml` grants (this file's flow style).
    fn role_grants(yaml: &str) -> std::collections::BTreeSet<(String, String, String)> {
        let role = yaml.split("\n---").next().expect("a Role first");
        let list = |line: &str| -> Vec<String> {
            let inner = line.split_once('[').and_then(|(_, r)| r.split_once(']'));
            inner
                .map(|(l, _)| {
                    l.split(',')
                        .map(|x| x.trim().trim_matches('"').to_string())
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut out = std::collections::BTreeSet::new();
        let (mut groups, mut resources) = (vec![], vec![]);
        for line in role.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("- apiGroups:") {
                groups = list(rest);
            } else if line.starts_with("resources:") {
                resources = list(line);
            } else if line.starts_with("verbs:") {
                for g in &groups {
                    for r in &resources {
                        for v in list(line) {
                            out.insert((v, g.clone(), r.clone()));
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn the_inbound_role_in_deploy_grants_exactly_what_the_inbound_commands_check() {
        let yaml = include_str!("../../../deploy/rbac-inbound.yaml");
        let granted = role_grants(yaml);
        let checked: std::collections::BTreeSet<_> = crate::cmd::inbound::INBOUND_PERMISSIONS
            .iter()
            .map(|p| {
                (
                    p.verb.to_string(),
                    p.group.to_string(),
                    p.resource.to_string(),
                )
            })
            .collect();
        assert_eq!(granted, checked);
    }

    #[test]
    /// Regression: the Role granted `get` on every Secret and ServiceAccount of the
    /// namespace, which ktctl never reads, and the preflight checked `update` where the
    /// renewer patches.
    fn the_role_in_deploy_grants_exactly_what_the_preflight_checks() {
        let yaml = include_str!("../../../deploy/rbac-connect.yaml");
        let granted = role_grants(yaml);
        let checked: std::collections::BTreeSet<_> = CONNECT_PERMISSIONS
            .iter()
            .map(|p| {
                (
                    p.verb.to_string(),
                    p.group.to_string(),
                    p.resource.to_string(),
                )
            })
            .collect();
        assert_eq!(granted, checked);
        assert!(!yaml.contains("secrets"), "no Secret is needed any more");
    }

    #[tokio::test]
    /// Regression: the custom connector (kept for TCP_NODELAY) dropped kubeconfig's
    /// `proxy-url`, so ktctl went straight to the API server where only a proxy leads.
    async fn the_kubeconfig_proxy_url_is_used() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::net::{TcpListener, TcpStream};

        // An API server that answers every request with its version.
        let api = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let api_addr = api.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut c, _)) = api.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    while let Ok(n) = c.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        let body = r#"{"major":"1","minor":"37","gitVersion":"v1.37.2","gitCommit":"x","gitTreeState":"clean","buildDate":"2026-01-01T00:00:00Z","goVersion":"go","compiler":"gc","platform":"linux/amd64"}"#;
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if c.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        // An HTTP CONNECT proxy that counts the tunnels it opens.
        let proxy = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let proxy_addr = proxy.local_addr().expect("addr");
        let tunnels = Arc::new(AtomicUsize::new(0));
        let counted = tunnels.clone();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = proxy.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let mut head = vec![];
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if c.read_exact(&mut byte).await.is_err() {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let Some(target) = head
                        .strip_prefix("CONNECT ")
                        .and_then(|r| r.split_whitespace().next())
                    else {
                        return;
                    };
                    let Ok(mut up) = TcpStream::connect(target).await else {
                        return;
                    };
                    counted.fetch_add(1, Ordering::SeqCst);
                    if c.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await
                        .is_ok()
                    {
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut up).await;
                    }
                });
            }
        });
        let dir = std::env::temp_dir().join(format!("kt-proxy-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let kubeconfig = dir.join("config");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://{api_addr}\n    proxy-url: http://{proxy_addr}\ncontexts:\n- name: x\n  context: {{cluster: c, user: u, namespace: default}}\ncurrent-context: x\nusers:\n- name: u\n  user: {{token: t}}\n"
            ),
        )
        .expect("kubeconfig");
        let kube = Kube::connect(&Target {
            kubeconfig: Some(kubeconfig),
            ..Default::default()
        })
        .await
        .expect("the API server answers through the proxy");
        std::fs::remove_dir_all(&dir).expect("cleanup");
        assert_eq!(kube.namespace, "default");
        assert!(
            tunnels.load(Ordering::SeqCst) >= 1,
            "ktctl did not go through the proxy"
        );
    }

    #[test]
    fn proxy_credentials_are_percent_decoded_into_basic_auth() {
        let uri: http::Uri = "http://user:pa%40ss%3Aword@proxy:3128".parse().unwrap();
        // base64("user:pa@ss:word")
        assert_eq!(proxy_auth(&uri).unwrap(), "Basic dXNlcjpwYUBzczp3b3Jk");
        let plain: http::Uri = "http://proxy:3128".parse().unwrap();
        assert!(proxy_auth(&plain).is_none());
        assert_eq!(percent_decode("%zz%4"), b"%zz%4".to_vec());
    }
}
