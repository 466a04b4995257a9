//! The router DaemonSet (deploy/router.yaml), as ktctl sees it: installed or not, and ready on
//! which nodes. `exchange --mode ebpf` needs it ready on every node it is scheduled to (a
//! caller on a node without it would reach the original pods).

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kt_common::changes::{ROUTER_DAEMONSET, ROUTER_NAMESPACE};
use kube::Api;
use kube::api::ListParams;

use super::{ClusterError, Kube};
use crate::error::{EnvError, Error, Result};

/// How to install the router, for error messages.
pub const INSTALL: &str = "a cluster admin installs it with `cargo xtask manifests --image <kt-router image> | kubectl apply -f -` (deploy/router.yaml)";

/// The router's pod on one node.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NodeRouter {
    pub node: String,
    pub pod: String,
    pub ready: bool,
}

/// The router's state in the cluster.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RouterHealth {
    /// Nodes the DaemonSet should run on.
    pub desired: i32,
    pub nodes: Vec<NodeRouter>,
}

impl RouterHealth {
    /// Ready on every node it is scheduled to.
    pub fn healthy(&self) -> bool {
        self.desired > 0 && self.nodes.iter().filter(|n| n.ready).count() as i32 >= self.desired
    }

    /// Why it is not healthy, naming the nodes.
    pub fn problem(&self) -> Option<String> {
        if self.healthy() {
            return None;
        }
        if self.desired == 0 {
            return Some("the kt-router DaemonSet runs on no node".into());
        }
        let unready: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| !n.ready)
            .map(|n| format!("{} (pod {})", n.node, n.pod))
            .collect();
        let ready = self.nodes.iter().filter(|n| n.ready).count();
        Some(format!(
            "kt-router is ready on {ready} of {} node(s){}",
            self.desired,
            if unready.is_empty() {
                String::new()
            } else {
                format!("; not ready on {}", unready.join(", "))
            }
        ))
    }
}

/// The router's state, or `None` when it is not installed.
pub async fn health(kube: &Kube) -> Result<Option<RouterHealth>> {
    let ds: Api<DaemonSet> = Api::namespaced(kube.client.clone(), ROUTER_NAMESPACE);
    let what = format!("daemonset {ROUTER_NAMESPACE}/{ROUTER_DAEMONSET}");
    let Some(ds) = ds
        .get_opt(ROUTER_DAEMONSET)
        .await
        .map_err(|e| ClusterError::api(&what, e))?
    else {
        return Ok(None);
    };
    let desired = ds.status.as_ref().map_or(0, |s| s.desired_number_scheduled);
    let selector = ds
        .spec
        .selector
        .match_labels
        .as_ref()
        .map(|l| {
            l.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(kube.client.clone(), ROUTER_NAMESPACE);
    let pods = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|e| ClusterError::api(format!("pods of {what}"), e))?;
    let mut nodes: Vec<NodeRouter> = pods
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| NodeRouter {
            node: p
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_else(|| "(unscheduled)".into()),
            pod: p.metadata.name.clone().unwrap_or_default(),
            ready: p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
        })
        .collect();
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(Some(RouterHealth { desired, nodes }))
}

/// The router, ready everywhere; otherwise a usage error (exit 2) saying what to do.
pub async fn require(kube: &Kube, why: &str) -> Result<RouterHealth> {
    let h = match health(kube).await {
        Ok(h) => h,
        Err(Error::Cluster(ClusterError::Forbidden(m))) => {
            return Err(EnvError::new(format!(
                "{why} needs to read the router's health and may not ({m}); deploy/router.yaml grants it to every user (Role ktctl-router-health in {ROUTER_NAMESPACE})"
            ))
            .into());
        }
        Err(e) => return Err(e),
    };
    match h {
        None => Err(EnvError::new(format!(
            "{why} needs the router DaemonSet, which is not installed in this cluster ({ROUTER_NAMESPACE}/{ROUTER_DAEMONSET}): {INSTALL}"
        ))
        .into()),
        Some(h) => match h.problem() {
            Some(p) => Err(EnvError::new(format!(
                "{why} needs the router on every node: {p} (`kubectl -n {ROUTER_NAMESPACE} describe daemonset {ROUTER_DAEMONSET}` says why)"
            ))
            .into()),
            None => Ok(h),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: &str, ready: bool) -> NodeRouter {
        NodeRouter {
            node: n.into(),
            pod: format!("kt-router-{n}"),
            ready,
        }
    }

    #[test]
    fn healthy_only_when_ready_on_every_scheduled_node() {
        let h = RouterHealth {
            desired: 2,
            nodes: vec![node("a", true), node("b", true)],
        };
        assert_eq!(h.problem(), None);
        let h = RouterHealth {
            desired: 2,
            nodes: vec![node("a", true), node("b", false)],
        };
        assert_eq!(
            h.problem().unwrap(),
            "kt-router is ready on 1 of 2 node(s); not ready on b (pod kt-router-b)"
        );
        let h = RouterHealth {
            desired: 3,
            nodes: vec![node("a", true), node("b", true)],
        };
        assert!(
            h.problem()
                .unwrap()
                .starts_with("kt-router is ready on 2 of 3")
        );
        let none = RouterHealth {
            desired: 0,
            nodes: vec![],
        };
        assert!(!none.healthy());
    }
}
