//! `ktctl birdseye`: the namespace seen from above. Which Services are exchanged, meshed or
//! previewed, by whom (user and machine), since when, and, with `--showConnector`, who is
//! connected. Everything is read from the objects ktctl's sessions own (their anchors, locks,
//! mesh routes, preview Services and shadows); nothing is changed. Last, the router
//! DaemonSet's health per node (what `--mode ebpf` needs).

use std::collections::BTreeMap;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kt_common::changes;
use kube::Api;
use kube::api::ListParams;

use super::inbound::LOCK_MODE;
use crate::cli::{BirdseyeArgs, Global, OutputFormat, SortBy};
use crate::cluster::leftovers::{self, Anchor, label, name_of};
use crate::cluster::router::{self, RouterHealth};
use crate::cluster::session::{MANAGED_BY, ROLE_LABEL, SESSION_LABEL};
use crate::cluster::{ClusterError, Permission, perm};
use crate::error::Result;

/// What birdseye reads (all of it in deploy/rbac-connect.yaml and deploy/rbac-inbound.yaml).
pub const PERMISSIONS: &[Permission] = &[
    perm("list", "coordination.k8s.io", "leases"),
    perm("list", "", "services"),
    perm("list", "", "configmaps"),
    perm("list", "", "pods"),
];

/// One session as birdseye shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Who {
    pub session: String,
    /// `user@machine`.
    pub owner: String,
    pub since: String,
}

/// A Service's state.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Row {
    pub service: String,
    /// `exchanged`, `meshed (auto)`, `meshed (manual)`, `previewing` or `normal`.
    pub state: String,
    pub by: Vec<Who>,
}

impl Row {
    fn line(&self) -> String {
        if self.by.is_empty() {
            return format!("> {} - {}", self.service, self.state);
        }
        let by: Vec<String> = self
            .by
            .iter()
            .map(|w| format!("[{}] since {} (session {})", w.owner, w.since, w.session))
            .collect();
        format!("> {} - {} by {}", self.service, self.state, by.join(", "))
    }
}

/// A connected user.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Connector {
    #[serde(flatten)]
    pub who: Who,
    /// Seconds since the session was last renewed.
    pub idle_secs: Option<i64>,
}

/// What birdseye reads, as plain objects (the seam the tests fill by hand).
#[derive(Default)]
pub struct View {
    pub anchors: Vec<Anchor>,
    pub locks: Vec<Lease>,
    pub services: Vec<Service>,
    pub routes: Vec<ConfigMap>,
    pub shadows: Vec<Pod>,
}

impl View {
    fn who(&self, id: &str) -> Who {
        match self.anchors.iter().find(|a| a.id == id) {
            Some(a) => Who {
                session: a.id.clone(),
                owner: a.owner.clone(),
                since: a.since.clone(),
            },
            None => Who {
                session: id.to_string(),
                owner: "unknown user".into(),
                since: "?".into(),
            },
        }
    }

    /// One row per Service that is not ktctl's own helper (the stuntman, a developer's mesh
    /// target), in the order asked for.
    pub fn rows(&self, sort: SortBy, hide_normal: bool) -> Vec<Row> {
        let mut rows = vec![];
        for svc in &self.services {
            let name = name_of(svc);
            let role = label(svc, ROLE_LABEL);
            if matches!(role, Some("mesh-target" | "mesh-router" | "lock")) {
                continue;
            }
            if label(svc, MANAGED_BY) == Some("ktctl") && role != Some("preview") {
                // The stuntman and other helpers of a mesh.
                continue;
            }
            let (state, ids) = self.state(svc, &name);
            if hide_normal && state == "normal" {
                continue;
            }
            rows.push(Row {
                service: name,
                state: state.to_string(),
                by: ids.iter().map(|id| self.who(id)).collect(),
            });
        }
        match sort {
            SortBy::Name => rows.sort_by(|a, b| a.service.cmp(&b.service)),
            SortBy::Status => {
                rows.sort_by(|a, b| (&a.state, &a.service).cmp(&(&b.state, &b.service)))
            }
        }
        rows
    }

    fn state(&self, svc: &Service, name: &str) -> (&'static str, Vec<String>) {
        if label(svc, ROLE_LABEL) == Some("preview") {
            let id = label(svc, SESSION_LABEL).unwrap_or_default().to_string();
            return ("previewing", vec![id]);
        }
        let meshing: Vec<String> = self
            .routes
            .iter()
            .filter(|r| label(*r, changes::MESH_OF) == Some(name))
            .filter_map(|r| label(r, SESSION_LABEL).map(str::to_string))
            .collect();
        if !meshing.is_empty() {
            return ("meshed (auto)", meshing);
        }
        let lock = self
            .locks
            .iter()
            .find(|l| name_of(*l) == format!("{name}-kt-lock"));
        if let Some(l) = lock {
            let mode = l
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(LOCK_MODE))
                .map(String::as_str);
            let holder = changes::holder(l.metadata.annotations.as_ref())
                .map(|h| h.session)
                .unwrap_or_default();
            if mode == Some("exchange") {
                return ("exchanged", vec![holder]);
            }
        }
        if let Some(h) = changes::holder(svc.metadata.annotations.as_ref())
            && h.session != changes::BY_MESH_ROUTER
        {
            return ("exchanged", vec![h.session]);
        }
        // Manual mesh: shadows carrying the Service's selector plus a version label, of
        // sessions without a route.
        let selector = svc.spec.as_ref().and_then(|s| s.selector.clone());
        if let Some(sel) = selector.filter(|s| !s.is_empty()) {
            let manual: Vec<String> = self
                .shadows
                .iter()
                .filter(|p| label(*p, ROLE_LABEL) == Some("shadow-mesh"))
                .filter(|p| {
                    let labels = p.metadata.labels.clone().unwrap_or_default();
                    sel.iter().all(|(k, v)| labels.get(k) == Some(v))
                })
                .filter_map(|p| label(p, SESSION_LABEL).map(str::to_string))
                .collect();
            if !manual.is_empty() {
                return ("meshed (manual)", manual);
            }
        }
        ("normal", vec![])
    }

    /// The sessions of `ktctl connect`.
    pub fn connectors(&self) -> Vec<Connector> {
        let mut out: Vec<Connector> = self
            .anchors
            .iter()
            .filter(|a| a.command == "connect")
            .map(|a| Connector {
                who: self.who(&a.id),
                idle_secs: a.idle_secs,
            })
            .collect();
        out.sort_by(|a, b| a.who.owner.cmp(&b.who.owner));
        out
    }
}

/// The router DaemonSet as birdseye shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum RouterView {
    /// Not installed (`--mode ebpf` is unavailable).
    Missing,
    /// Could not be read (the reason).
    Unknown {
        reason: String,
    },
    Installed(RouterHealth),
}

impl RouterView {
    async fn read(kube: &crate::cluster::Kube) -> RouterView {
        match router::health(kube).await {
            Ok(None) => RouterView::Missing,
            Ok(Some(h)) => RouterView::Installed(h),
            Err(e) => RouterView::Unknown {
                reason: e.to_string(),
            },
        }
    }

    /// The table form's router section.
    pub fn render(&self) -> String {
        let mut out = format!(
            "---- Router ({}/{}, for --mode ebpf) ----\n",
            changes::ROUTER_NAMESPACE,
            changes::ROUTER_DAEMONSET
        );
        match self {
            RouterView::Missing => out.push_str("> not installed (deploy/router.yaml)\n"),
            RouterView::Unknown { reason } => out.push_str(&format!("> unknown: {reason}\n")),
            RouterView::Installed(h) => {
                for n in &h.nodes {
                    let state = if n.ready { "ready" } else { "not ready" };
                    out.push_str(&format!("> {}: {state} (pod {})\n", n.node, n.pod));
                }
                match h.problem() {
                    None => out.push_str(&format!("ready on all {} node(s)\n", h.desired)),
                    Some(p) => out.push_str(&format!("{p}\n")),
                }
            }
        }
        out
    }
}

/// The lines of the table form.
pub fn render(namespace: &str, rows: &[Row], connectors: Option<&[Connector]>) -> String {
    let mut out = format!("---- Service in namespace {namespace} ----\n");
    for r in rows {
        out.push_str(&r.line());
        out.push('\n');
    }
    if let Some(c) = connectors {
        out.push_str("---- User connecting to cluster ----\n");
        for c in c {
            let active = c
                .idle_secs
                .map(|s| format!("last active {} min ago", s / 60))
                .unwrap_or_else(|| "last active unknown".into());
            out.push_str(&format!(
                "> {} ({active}, session {})\n",
                c.who.owner, c.who.session
            ));
        }
        let users: std::collections::BTreeSet<&str> =
            c.iter().map(|c| c.who.owner.as_str()).collect();
        out.push_str(&format!("{} users in total\n", users.len()));
    }
    out
}

pub async fn run(global: &Global, args: &BirdseyeArgs) -> Result<u8> {
    let kube = super::connect_kube(global).await?;
    kube.require_from(
        PERMISSIONS,
        "deploy/rbac-connect.yaml with deploy/rbac-inbound.yaml",
    )
    .await?;
    let c = &kube.client;
    let ns = &kube.namespace;
    let (anchors, locks) = leftovers::sessions(&kube).await?;
    let view = View {
        anchors,
        locks,
        services: Api::<Service>::namespaced(c.clone(), ns)
            .list(&ListParams::default())
            .await
            .map_err(|e| ClusterError::api("listing services", e))?
            .items,
        routes: leftovers::routes(&kube).await?,
        shadows: Api::<Pod>::namespaced(c.clone(), ns)
            .list(&ListParams::default().labels(&format!("{MANAGED_BY}=ktctl")))
            .await
            .map_err(|e| ClusterError::api("listing ktctl's pods", e))?
            .items,
    };
    let rows = view.rows(args.sort_by, args.hide_natural_service);
    let connectors = args.show_connector.then(|| view.connectors());
    let router = RouterView::read(&kube).await;
    match args.output {
        OutputFormat::Json => {
            let mut doc = BTreeMap::new();
            doc.insert("namespace", serde_json::json!(ns));
            doc.insert("services", serde_json::json!(rows));
            if let Some(c) = &connectors {
                doc.insert("connectors", serde_json::json!(c));
            }
            doc.insert("router", serde_json::json!(router));
            println!(
                "{}",
                serde_json::to_string_pretty(&doc).expect("serialisable")
            );
        }
        OutputFormat::Table => print!(
            "{}{}",
            render(ns, &rows, connectors.as_deref()),
            router.render()
        ),
    }
    Ok(0)
}

#[cfg(test)]
mod tests;
