//! The cluster's names, kept current by watches (kube-runtime reflectors), so that Service
//! names are answered without a round trip through the tunnel.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::Ingress;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;

use crate::cluster::{ClusterError, Kube, Permission};

/// What the watch knows of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Addresses (ClusterIPs, or ready endpoints of a headless Service).
    Addresses(Vec<IpAddr>),
    /// An ExternalName Service.
    Alias(String),
}

/// Whether the watch covers a namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The watch covers the namespace and the Service exists.
    Found(Answer),
    /// The watch covers the namespace and has no such Service.
    Missing,
    /// The watch does not cover this namespace (ask the cluster's DNS).
    Unknown,
}

/// Reflector stores of Services, EndpointSlices and (when readable) Namespaces.
#[derive(Clone)]
pub struct Index {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    namespaces: Option<Store<Namespace>>,
    /// None: every namespace is watched; Some(ns): only that one.
    only: Option<String>,
    tasks: std::sync::Arc<Vec<tokio::task::AbortHandle>>,
    /// `--ingressIp`: the address every Ingress host of the namespace is answered with, and
    /// the watch of those Ingresses.
    ingresses: Option<(std::net::Ipv4Addr, Store<Ingress>)>,
}

impl Drop for Index {
    fn drop(&mut self) {
        if std::sync::Arc::strong_count(&self.tasks) == 1 {
            for t in self.tasks.iter() {
                t.abort();
            }
        }
    }
}

fn watch<K>(api: Api<K>) -> (Store<K>, tokio::task::AbortHandle)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store::<K>();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .touched_objects();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(ev) = stream.next().await {
            match ev {
                Err(e) if !failing => {
                    tracing::warn!(error = %e, "a cluster watch failed; retrying");
                    failing = true;
                }
                Ok(_) => failing = false,
                Err(_) => {}
            }
        }
    });
    (reader, task.abort_handle())
}

/// What `--ingressIp` needs.
pub const INGRESS_PERMISSIONS: &[Permission] = &[
    Permission {
        verb: "list",
        group: "networking.k8s.io",
        resource: "ingresses",
    },
    Permission {
        verb: "watch",
        group: "networking.k8s.io",
        resource: "ingresses",
    },
];

/// An Ingress host (`app.example.com`, or `*.example.com` for exactly one more label) against
/// a query name, both lowercase without the root dot.
pub fn host_matches(host: &str, q: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    match host.strip_prefix("*.") {
        Some(base) => q
            .strip_suffix(base)
            .and_then(|rest| rest.strip_suffix('.'))
            .is_some_and(|label| !label.is_empty() && !label.contains('.')),
        None => host == q,
    }
}

impl Index {
    /// Watches every namespace if the user may, else the connect namespace only; waits for
    /// the first lists (10 s at most).
    pub async fn start(kube: &Kube) -> Result<Index, ClusterError> {
        let list = |r| Permission {
            verb: "list",
            group: "",
            resource: r,
        };
        let watchp = |r| Permission {
            verb: "watch",
            group: "",
            resource: r,
        };
        let cluster_wide =
            kube.can(&list("services"), None).await? && kube.can(&watchp("services"), None).await?;
        let c = kube.client.clone();
        let (services, t1, slices, t2, only) = if cluster_wide {
            let (s, t1) = watch(Api::<Service>::all(c.clone()));
            let (e, t2) = watch(Api::<EndpointSlice>::all(c.clone()));
            (s, t1, e, t2, None)
        } else {
            tracing::info!(
                "watching Services in namespace {} only (no cluster-wide list/watch permission); other namespaces resolve through the cluster's DNS",
                kube.namespace
            );
            let (s, t1) = watch(Api::<Service>::namespaced(c.clone(), &kube.namespace));
            let (e, t2) = watch(Api::<EndpointSlice>::namespaced(c.clone(), &kube.namespace));
            (s, t1, e, t2, Some(kube.namespace.clone()))
        };
        let mut tasks = vec![t1, t2];
        let namespaces = if kube.can(&list("namespaces"), None).await?
            && kube.can(&watchp("namespaces"), None).await?
        {
            let (n, t) = watch(Api::<Namespace>::all(c));
            tasks.push(t);
            Some(n)
        } else {
            None
        };
        let ready = async {
            let _ = services.wait_until_ready().await;
            let _ = slices.wait_until_ready().await;
            if let Some(n) = &namespaces {
                let _ = n.wait_until_ready().await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(10), ready)
            .await
            .is_err()
        {
            tracing::warn!(
                "the cluster watches are slow to start; names resolve through the cluster's DNS meanwhile"
            );
        }
        Ok(Index {
            services,
            slices,
            namespaces,
            only,
            tasks: std::sync::Arc::new(tasks),
            ingresses: None,
        })
    }

    /// Answers the host names of the namespace's Ingresses with `ip` (`--ingressIp`), as the
    /// watch of them finds them.
    pub async fn watch_ingresses(
        &mut self,
        kube: &Kube,
        ip: std::net::Ipv4Addr,
    ) -> Result<(), ClusterError> {
        kube.require_from(INGRESS_PERMISSIONS, "deploy/rbac-ingress.yaml")
            .await?;
        let (store, task) = watch(Api::<Ingress>::namespaced(
            kube.client.clone(),
            &kube.namespace,
        ));
        if tokio::time::timeout(Duration::from_secs(10), store.wait_until_ready())
            .await
            .is_err()
        {
            tracing::warn!("the watch of Ingresses is slow to start");
        }
        // The watch lives as long as the Index's other watches.
        let mut tasks = (*self.tasks).clone();
        tasks.push(task);
        self.tasks = std::sync::Arc::new(tasks);
        self.ingresses = Some((ip, store));
        Ok(())
    }

    /// The `--ingressIp` address if `qname` is the host of an Ingress (exactly, or under a
    /// `*.` wildcard host, one label deep).
    pub fn ingress(&self, qname: &str) -> Option<IpAddr> {
        let (ip, store) = self.ingresses.as_ref()?;
        let q = qname.trim_end_matches('.').to_ascii_lowercase();
        let hit = store.state().iter().any(|ing| {
            ing.spec
                .iter()
                .flat_map(|s| s.rules.iter().flatten())
                .filter_map(|r| r.host.as_deref())
                .any(|h| host_matches(h, &q))
        });
        hit.then_some(IpAddr::V4(*ip))
    }

    fn covers(&self, ns: &str) -> bool {
        self.only.as_deref().is_none_or(|o| o == ns)
    }

    /// Whether `ns` is a namespace of the cluster, as far as the watches know.
    pub fn is_namespace(&self, ns: &str) -> bool {
        if let Some(store) = &self.namespaces {
            return store.get(&ObjectRef::new(ns)).is_some();
        }
        self.only.as_deref() == Some(ns)
            || self
                .services
                .state()
                .iter()
                .any(|s| s.metadata.namespace.as_deref() == Some(ns))
    }

    /// Namespaces seen so far (for logs).
    pub fn namespace_count(&self) -> usize {
        match &self.namespaces {
            Some(n) => n.len(),
            None => self
                .services
                .state()
                .iter()
                .filter_map(|s| s.metadata.namespace.clone())
                .collect::<BTreeSet<_>>()
                .len(),
        }
    }

    /// The Service `ns/name`.
    pub fn service(&self, name: &str, ns: &str) -> Lookup {
        if !self.covers(ns) {
            return Lookup::Unknown;
        }
        let Some(svc) = self.services.get(&ObjectRef::new(name).within(ns)) else {
            return Lookup::Missing;
        };
        let spec = svc.spec.clone().unwrap_or_default();
        if spec.type_.as_deref() == Some("ExternalName") {
            return Lookup::Found(Answer::Alias(spec.external_name.unwrap_or_default()));
        }
        let ips: Vec<IpAddr> = spec
            .cluster_ips
            .unwrap_or_default()
            .iter()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        if !ips.is_empty() {
            return Lookup::Found(Answer::Addresses(ips));
        }
        // Headless: the ready endpoints.
        Lookup::Found(Answer::Addresses(self.endpoints(name, ns, None)))
    }

    /// Ready endpoint addresses of a Service (optionally only the one with `hostname`).
    pub fn endpoints(&self, service: &str, ns: &str, hostname: Option<&str>) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = vec![];
        for slice in self.slices.state() {
            if slice.metadata.namespace.as_deref() != Some(ns)
                || slice
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("kubernetes.io/service-name"))
                    .map(String::as_str)
                    != Some(service)
            {
                continue;
            }
            for ep in slice.endpoints.iter().flatten() {
                if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                    continue;
                }
                if hostname.is_some_and(|h| ep.hostname.as_deref() != Some(h)) {
                    continue;
                }
                out.extend(ep.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()));
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// The pod `hostname` behind Service `ns/service`.
    pub fn endpoint(&self, hostname: &str, service: &str, ns: &str) -> Lookup {
        if !self.covers(ns) {
            return Lookup::Unknown;
        }
        match self.endpoints(service, ns, Some(hostname)) {
            v if v.is_empty() => Lookup::Missing,
            v => Lookup::Found(Answer::Addresses(v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::host_matches;

    #[test]
    fn ingress_hosts_match_exactly_or_one_label_under_a_wildcard() {
        assert!(host_matches("shop.kt.test", "shop.kt.test"));
        assert!(host_matches("Shop.KT.test.", "shop.kt.test"));
        assert!(!host_matches("shop.kt.test", "www.shop.kt.test"));
        assert!(host_matches("*.kt.test", "shop.kt.test"));
        assert!(!host_matches("*.kt.test", "kt.test"));
        assert!(!host_matches("*.kt.test", "a.shop.kt.test"));
        assert!(!host_matches("*.kt.test", "shopkt.test"));
    }
}
