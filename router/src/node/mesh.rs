//! The node's mesh proxies (`mesh --mode ebpf`): for each TCP port of a meshed Service, a
//! listener on the node's IP running the same proxy as `kt-router mesh`. The steering map
//! sends the port's ClusterIP:port and endpoints there; each request carrying a shadow's
//! header goes to that shadow, anything else to the address the caller dialled (read back
//! from the tc programs' reverse flow map for a pod, from the node's sock_addr programs'
//! record of the caller's socket for a hostNetwork caller), or, for a caller found in
//! neither (its record evicted), to the ClusterIP. The proxies' own connections carry
//! [`BYPASS_MARK`], so that the node's sock_addr programs let them through.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, PoisonError, RwLock};

use anyhow::{Context, Result};
use kt_common::steer::BYPASS_MARK;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::desired::{Desired, Mesh, Steer};
use crate::mesh::proxy::{self, DefaultOf, Upstream};
use crate::mesh::routes::{Host, Route, Routes};
use crate::steer::{FlowReader, Proto};

/// One meshed Service port's proxy; dropping it stops its listener (connections under way
/// finish).
struct PortProxy {
    at: SocketAddrV4,
    /// Where connections without a remembered flow go.
    fallback: Arc<RwLock<Option<Upstream>>>,
    task: JoinHandle<()>,
}

impl Drop for PortProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The node's mesh proxies, by Service and port.
pub struct Meshes {
    node_ip: Ipv4Addr,
    flows: Arc<FlowReader>,
    routes: BTreeMap<String, (Arc<Routes>, Vec<Route>)>,
    /// By Service, port and target port.
    proxies: BTreeMap<(String, u16, u16), PortProxy>,
}

impl Meshes {
    pub fn new(node_ip: Ipv4Addr, flows: FlowReader) -> Meshes {
        Meshes {
            node_ip,
            flows: Arc::new(flows),
            routes: BTreeMap::new(),
            proxies: BTreeMap::new(),
        }
    }

    /// Starts and stops proxies to match `meshes`, sets their routes (one log line per
    /// change), and adds the steering they need to `desired` (an exchange's steering of the
    /// same address, already there, wins).
    pub async fn apply(&mut self, meshes: Vec<Mesh>, desired: &mut Desired) {
        let mut keep = BTreeSet::new();
        let mut services = BTreeSet::new();
        for m in meshes {
            services.insert(m.service.clone());
            let (routes, known) = self.routes.entry(m.service.clone()).or_default();
            if *known != m.routes {
                for r in &m.routes {
                    tracing::info!(change = "route", service = %m.service, header = %r.header, value = r.value.to_str().unwrap_or("?"), target = %r.target, shadow = %r.configmap, "mesh route");
                }
                routes.set(m.routes.clone());
                *known = m.routes;
            }
            let routes = routes.clone();
            for port in m.ports {
                let key = (m.service.clone(), port.port, port.target);
                let fallback = port.from.first().map(|a| Upstream {
                    host: Host::ip((*a.ip()).into()),
                    port: a.port(),
                });
                if !self.proxies.contains_key(&key) {
                    match self.start(routes.clone(), port.target).await {
                        Ok(p) => {
                            tracing::info!(service = %m.service, port = port.port, at = %p.at, "mesh proxy listening");
                            self.proxies.insert(key.clone(), p);
                        }
                        Err(e) => {
                            tracing::error!(service = %m.service, port = port.port, error = %format!("{e:#}"), "cannot start a mesh proxy");
                            continue;
                        }
                    }
                }
                let proxy = &self.proxies[&key];
                *proxy
                    .fallback
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = fallback;
                for from in &port.from {
                    desired.entry((*from, Proto::Tcp)).or_insert_with(|| Steer {
                        to: proxy.at,
                        service: m.service.clone(),
                        shadow: "node mesh proxy".to_string(),
                    });
                }
                keep.insert(key);
            }
        }
        self.proxies.retain(|key, p| {
            let k = keep.contains(key);
            let (svc, port, _) = key;
            if !k {
                tracing::info!(service = %svc, port, at = %p.at, "mesh proxy stopped");
            }
            k
        });
        self.routes.retain(|s, _| {
            let k = services.contains(s);
            if !k {
                tracing::info!(change = "unroute", service = %s, "no mesh route left");
            }
            k
        });
    }

    /// A proxy on a new port of the node's IP; requests that match a route go to the route's
    /// shadow on `target`.
    async fn start(&self, routes: Arc<Routes>, target: u16) -> Result<PortProxy> {
        let listener = TcpListener::bind((self.node_ip, 0))
            .await
            .with_context(|| format!("listening on {}", self.node_ip))?;
        let SocketAddr::V4(at) = listener.local_addr()? else {
            anyhow::bail!("an IPv4 listener with an IPv6 address");
        };
        let fallback: Arc<RwLock<Option<Upstream>>> = Arc::default();
        let flows = self.flows.clone();
        let or_else = fallback.clone();
        let default: DefaultOf = Arc::new(move |peer| {
            let original = match peer {
                SocketAddr::V4(p) => flows.original(p, at).or_else(|| flows.node_original(p, at)),
                SocketAddr::V6(_) => None,
            };
            match original {
                Some(o) => Some(Upstream {
                    host: Host::ip((*o.ip()).into()),
                    port: o.port(),
                }),
                None => or_else
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone(),
            }
        });
        let task = tokio::spawn(proxy::serve(
            listener,
            routes,
            target,
            default,
            Some(BYPASS_MARK),
        ));
        Ok(PortProxy { at, fallback, task })
    }
}
