//! `ktctl forward <target> [local[:remote]]`: a cluster target appears on localhost.
//!
//! Each local connection gets its own stream to the target, so a failure costs only that
//! connection and the next one starts afresh:
//! - a pod, Service or Deployment: a port-forward through the API server to a ready pod. The
//!   pod is looked up again whenever the last one fails (deleted, evicted, replaced), with
//!   backoff while none is ready — kt-connect kept knocking on a dead pod's name;
//! - an IP address: a stream through a connect-style tunnel (a shadow, mutually authenticated
//!   TLS), which heals itself like `connect`'s.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kt_common::wire::Open;
use kube::Api;
use kube::api::ListParams;
use tokio::net::{TcpListener, TcpStream};

use super::Signals;
use super::inbound::Target;
use crate::cli::{ForwardArgs, Global};
use crate::cluster::{CONNECT_PERMISSIONS, ClusterError, Kube};
use crate::error::{EnvError, Error, Result};
use crate::interrupt::{self, Interrupts};
use crate::tunnel::Tunnel;

/// How long a local connection waits for a ready pod (or the tunnel) before it is closed.
const RESOLVE_WAIT: Duration = Duration::from_secs(30);

/// `local[:remote]`.
fn parse_ports(s: &str) -> std::result::Result<(u16, Option<u16>), EnvError> {
    let port = |p: &str| match p.trim().parse::<u32>() {
        Ok(n) if (1..=65_535).contains(&n) => Ok(n as u16),
        _ => Err(EnvError::new(format!(
            "{s:?}: {p:?} is not a port (1-65535); give local[:remote]"
        ))),
    };
    match s.split_once(':') {
        Some((l, r)) => Ok((port(l)?, Some(port(r)?))),
        None => Ok((port(s)?, None)),
    }
}

pub async fn run(global: &Global, args: &ForwardArgs) -> Result<u8> {
    let ports = args.ports.as_deref().map(parse_ports).transpose()?;
    if let Ok(ip) = args.target.parse::<Ipv4Addr>() {
        let Some((local, Some(remote))) = ports else {
            return Err(EnvError::new(format!(
                "forward {ip}: give the ports as local:remote (an address has no default port)"
            ))
            .into());
        };
        return forward_address(global, args, SocketAddr::from((ip, remote)), local).await;
    }
    let target = Target::parse(&args.target)?;
    let kube = super::connect_kube(global).await?;
    let pods = PodResolver::new(&kube, &target).await?;
    let (local, remote) = match ports {
        Some((l, Some(r))) => (l, r),
        Some((l, None)) => (l, pods.default_port.ok_or_else(|| no_port(&target))?),
        None => {
            let p = pods.default_port.ok_or_else(|| no_port(&target))?;
            (p, p)
        }
    };
    let listener = bind(local).await?;
    let pods = Arc::new(pods);
    let interrupts =
        Interrupts::install("forward").map_err(|e| Error::io("handling signals", e))?;
    let mark = interrupts.count();
    // Fail now, not at the first connection, if nothing can serve it.
    pods.resolve(remote).await?;
    inbound_banner_forward(&target, remote, local);
    let serve = async {
        loop {
            let Ok((conn, peer)) = listener.accept().await else {
                continue;
            };
            let pods = pods.clone();
            tokio::spawn(async move {
                let _ = conn.set_nodelay(true);
                if let Err(e) = pods.forward(conn, remote).await {
                    tracing::warn!(%peer, error = %e, "forwarded connection failed");
                }
            });
        }
    };
    tokio::select! {
        () = serve => Ok(0),
        sig = interrupts.after(mark) => {
            tracing::info!("{}", interrupt::describe(sig));
            Ok(0)
        }
    }
}

fn inbound_banner_forward(target: &Target, remote: u16, local: u16) {
    super::inbound::banner(&format!(
        "Now you can access port {remote} of {} '{}' via 'localhost:{local}'",
        target.kind(),
        target.name()
    ));
}

fn no_port(target: &Target) -> Error {
    EnvError::new(format!(
        "{}/{} declares no port; give local:remote",
        target.kind(),
        target.name()
    ))
    .into()
}

async fn bind(local: u16) -> Result<TcpListener> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, local))
        .await
        .map_err(|e| {
            EnvError::new(format!(
                "cannot listen on 127.0.0.1:{local}: {e}; choose another local port"
            ))
            .into()
        })
}

/// Finds a ready pod for a target, again after each failure.
struct PodResolver {
    api: Api<Pod>,
    target: Target,
    /// Pods of the target: a label selector (Service, Deployment) or one name (pod/x).
    selector: Option<BTreeMap<String, String>>,
    /// A Service's port -> its target port (a number or a container port's name).
    service_ports: Vec<(u16, IntOrString)>,
    default_port: Option<u16>,
    /// The pod in use and its port.
    current: Mutex<Option<(String, u16)>>,
}

impl PodResolver {
    async fn new(kube: &Kube, target: &Target) -> Result<PodResolver> {
        let ns = &kube.namespace;
        let missing = |kind: &str, n: &str| {
            Error::from(EnvError::new(format!(
                "{kind} '{n}' not found in namespace {ns}"
            )))
        };
        let api = Api::<Pod>::namespaced(kube.client.clone(), ns);
        let (selector, service_ports, default_port) = match target {
            Target::Pod(n) => {
                let p = api
                    .get_opt(n)
                    .await
                    .map_err(|e| ClusterError::api(format!("reading pod {n}"), e))?
                    .ok_or_else(|| missing("pod", n))?;
                (None, vec![], first_container_port(&p))
            }
            Target::Service(n) => {
                let s = Api::<Service>::namespaced(kube.client.clone(), ns)
                    .get_opt(n)
                    .await
                    .map_err(|e| ClusterError::api(format!("reading service {n}"), e))?
                    .ok_or_else(|| missing("service", n))?;
                let spec = s.spec.unwrap_or_default();
                let selector = spec.selector.filter(|s| !s.is_empty()).ok_or_else(|| {
                    EnvError::new(format!(
                        "service '{n}' has no selector, so ktctl cannot find its pods; forward one of its endpoints' addresses instead"
                    ))
                })?;
                let ports: Vec<(u16, IntOrString)> = spec
                    .ports
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|p| {
                        let port = u16::try_from(p.port).ok()?;
                        Some((port, p.target_port.unwrap_or(IntOrString::Int(p.port))))
                    })
                    .collect();
                let first = ports.first().map(|p| p.0);
                (Some(selector), ports, first)
            }
            Target::Deployment(n) => {
                let d = Api::<Deployment>::namespaced(kube.client.clone(), ns)
                    .get_opt(n)
                    .await
                    .map_err(|e| ClusterError::api(format!("reading deployment {n}"), e))?
                    .ok_or_else(|| missing("deployment", n))?;
                let selector = d.spec.selector.match_labels.clone().unwrap_or_default();
                let first = d
                    .spec
                    .template
                    .spec
                    .as_ref()
                    .and_then(|s| s.containers.first())
                    .and_then(|c| c.ports.as_ref()?.first())
                    .and_then(|p| u16::try_from(p.container_port).ok());
                (Some(selector), vec![], first)
            }
        };
        Ok(PodResolver {
            api,
            target: target.clone(),
            selector,
            service_ports,
            default_port,
            current: Mutex::new(None),
        })
    }
}

fn first_container_port(p: &Pod) -> Option<u16> {
    p.spec
        .as_ref()?
        .containers
        .iter()
        .find_map(|c| c.ports.as_ref()?.first())
        .and_then(|p| u16::try_from(p.container_port).ok())
}

fn is_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

impl PodResolver {
    /// A ready pod and the port on it that `remote` means.
    async fn resolve(&self, remote: u16) -> Result<(String, u16)> {
        let pod = match &self.selector {
            None => {
                let name = self.target.name().to_string();
                self.api
                    .get_opt(&name)
                    .await
                    .map_err(|e| ClusterError::api(format!("reading pod {name}"), e))?
                    .filter(is_ready)
                    .ok_or_else(|| Error::Runtime(format!("pod '{name}' is not ready")))?
            }
            Some(sel) => {
                let labels = sel
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",");
                let list = self
                    .api
                    .list(&ListParams::default().labels(&labels))
                    .await
                    .map_err(|e| ClusterError::api("listing pods", e))?;
                list.items.into_iter().find(is_ready).ok_or_else(|| {
                    Error::Runtime(format!(
                        "no ready pod of {}/{} (selector {labels})",
                        self.target.kind(),
                        self.target.name()
                    ))
                })?
            }
        };
        let port = self.pod_port(&pod, remote)?;
        let name = pod.metadata.name.clone().unwrap_or_default();
        Ok((name, port))
    }

    /// The pod's port for `remote`: a Service port maps to its target port.
    fn pod_port(&self, pod: &Pod, remote: u16) -> Result<u16> {
        let Some((_, target)) = self.service_ports.iter().find(|(p, _)| *p == remote) else {
            if self.service_ports.is_empty() {
                return Ok(remote);
            }
            return Err(EnvError::new(format!(
                "service '{}' has no port {remote}",
                self.target.name()
            ))
            .into());
        };
        match target {
            IntOrString::Int(n) => {
                u16::try_from(*n).map_err(|_| Error::Runtime(format!("bad target port {n}")))
            }
            IntOrString::String(name) => pod
                .spec
                .as_ref()
                .and_then(|s| {
                    s.containers
                        .iter()
                        .flat_map(|c| c.ports.iter().flatten())
                        .find(|p| p.name.as_deref() == Some(name.as_str()))
                })
                .and_then(|p| u16::try_from(p.container_port).ok())
                .ok_or_else(|| Error::Runtime(format!("no container port named {name}"))),
        }
    }

    /// Forwards one local connection: through the current pod, or (after a failure) through a
    /// pod found again, retrying with backoff for up to [`RESOLVE_WAIT`].
    async fn forward(&self, conn: TcpStream, remote: u16) -> Result<()> {
        let started = Instant::now();
        let mut delay = Duration::from_millis(200);
        loop {
            let cached = self.current.lock().expect("pod lock").clone();
            let attempt = async {
                let (pod, port) = match cached {
                    Some(p) => p,
                    None => {
                        let found = self.resolve(remote).await?;
                        tracing::info!("Forwarding to pod {}", found.0);
                        *self.current.lock().expect("pod lock") = Some(found.clone());
                        found
                    }
                };
                crate::cluster::portforward::open(&self.api, &pod, port)
                    .await
                    .map_err(Error::from)
            };
            match attempt.await {
                Ok(stream) => {
                    kt_common::tunnel::splice(conn, stream, 64 * 1024).await;
                    return Ok(());
                }
                Err(e) => {
                    *self.current.lock().expect("pod lock") = None;
                    if started.elapsed() + delay > RESOLVE_WAIT {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, retry_in = ?delay, "port-forward failed; looking for a pod again");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(3));
                }
            }
        }
    }
}

/// An address in the cluster, through a shadow's tunnel.
async fn forward_address(
    global: &Global,
    args: &ForwardArgs,
    dst: SocketAddr,
    local: u16,
) -> Result<u8> {
    let kube = super::connect_kube(global).await?;
    kube.require(CONNECT_PERMISSIONS).await?;
    let listener = bind(local).await?;
    let mut opts = super::shadow_options(global)?;
    opts.routes = vec![format!("{}/32", dst.ip())];
    let interrupts =
        Interrupts::install("forward").map_err(|e| Error::io("handling signals", e))?;
    let mark = interrupts.count();
    super::with_shadow(
        &kube,
        &opts,
        "forward",
        Duration::from_secs(args.session.grace),
        Duration::from_secs(global.port_forward_timeout),
        &interrupts,
        Signals::Body,
        async |_session, tunnel| {
            super::inbound::banner(&format!("Now you can access to '{dst}' via 'localhost:{local}'"));
            let serve = async {
                loop {
                    let Ok((conn, peer)) = listener.accept().await else {
                        continue;
                    };
                    let tunnel: Tunnel = tunnel.clone();
                    tokio::spawn(async move {
                        let _ = conn.set_nodelay(true);
                        match tunnel.request(Open::Tcp(dst)).await {
                            Ok(s) => kt_common::tunnel::splice(conn, s, 64 * 1024).await,
                            Err(e) => tracing::warn!(%peer, %dst, error = %e, "forwarded connection failed"),
                        }
                    });
                }
            };
            tokio::select! {
                () = serve => Ok(0),
                sig = interrupts.after(mark) => {
                    tracing::info!("{}", interrupt::describe(sig));
                    Ok(0)
                }
            }
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse_as_local_and_optional_remote() {
        assert_eq!(parse_ports("6060:80"), Ok((6060, Some(80))));
        assert_eq!(parse_ports("8080"), Ok((8080, None)));
        for bad in ["0", "70000", "a:80", "80:", ":80"] {
            assert!(parse_ports(bad).is_err(), "{bad}");
        }
    }
}
