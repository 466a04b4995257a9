//! What ktctl sessions left in a namespace, read from the objects alone (no laptop needed),
//! and the steps that undo it: `ktctl recover` and `ktctl clean`.
//!
//! A [`Survey`] reads the sessions' anchors, the objects carrying ktctl's record of a change
//! (kt-common's `changes`: `kt.dev/changed-by` and the originals), the mesh routes and the
//! locks. [`Survey::clean`] and [`Survey::recover`] turn it into [`Step`]s without touching
//! the cluster (so `--dryRun` prints exactly what a real run does), and [`apply`] runs one.
//!
//! Liveness is read on the API server's clock only, as [`session::is_expired`] does: a
//! session is alive while its anchor has been renewed (its last change, stamped by the API
//! server) within the given number of seconds.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::jiff::Timestamp;
use kt_common::changes::{self, Holder, ModifyError};
use kube::Api;
use kube::api::{DeleteParams, ListParams};

use super::session::{
    self, COMMAND_ANNOTATION, GRACE_ANNOTATION, MANAGED_BY, OWNER_ANNOTATION, ROLE_LABEL,
    SESSION_LABEL,
};
use super::{ClusterError, Kube, Permission, perm};

/// What `recover` and `clean` call (a subset of deploy/rbac-connect.yaml and
/// deploy/rbac-inbound.yaml).
pub const PERMISSIONS: &[Permission] = &[
    perm("list", "coordination.k8s.io", "leases"),
    perm("delete", "coordination.k8s.io", "leases"),
    perm("list", "", "services"),
    perm("get", "", "services"),
    perm("update", "", "services"),
    perm("list", "apps", "deployments"),
    perm("get", "apps", "deployments"),
    perm("update", "apps", "deployments"),
    perm("list", "", "configmaps"),
];

/// One session, as its anchor Lease describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Anchor {
    pub id: String,
    pub lease: String,
    /// `connect`, `exchange`, ...
    pub command: String,
    /// `user@machine`.
    pub owner: String,
    pub grace_secs: i64,
    /// Seconds since the API server last saw it renewed; `None` if it cannot tell.
    pub idle_secs: Option<i64>,
    /// When it began (the anchor's creation, RFC 3339).
    pub since: String,
}

impl Anchor {
    pub fn from_lease(l: &Lease, now: Timestamp) -> Anchor {
        let a = l.metadata.annotations.clone().unwrap_or_default();
        let get = |k: &str| a.get(k).cloned().unwrap_or_default();
        let lease = l.metadata.name.clone().unwrap_or_default();
        Anchor {
            id: l
                .metadata
                .labels
                .as_ref()
                .and_then(|m| m.get(SESSION_LABEL).cloned())
                .unwrap_or_else(|| lease.trim_start_matches("ktctl-").to_string()),
            lease,
            command: get(COMMAND_ANNOTATION),
            owner: get(OWNER_ANNOTATION),
            grace_secs: get(GRACE_ANNOTATION).parse().unwrap_or_else(|_| {
                i64::from(
                    l.spec
                        .as_ref()
                        .and_then(|s| s.lease_duration_seconds)
                        .unwrap_or(30),
                )
            }),
            idle_secs: session::idle_seconds(l, now),
            since: l
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default(),
        }
    }

    /// Alive: renewed within `secs` (an anchor whose age is unknown counts as alive).
    pub fn alive_within(&self, secs: i64) -> bool {
        self.idle_secs.is_none_or(|idle| idle <= secs)
    }

    pub fn describe(&self) -> String {
        let mut s = format!("session {}", self.id);
        if !self.command.is_empty() {
            s.push_str(&format!(" ({}", self.command));
            if !self.owner.is_empty() {
                s.push_str(&format!(" by {}", self.owner));
            }
            s.push(')');
        }
        s
    }
}

/// Everything ktctl's sessions have in a namespace that `recover` and `clean` look at.
#[derive(Clone, Debug, Default)]
pub struct Survey {
    pub anchors: Vec<Anchor>,
    /// Services and Deployments that carry ktctl's record of a change.
    pub services: Vec<Service>,
    pub deployments: Vec<Deployment>,
    /// Mesh routes (ConfigMaps labelled `kt.dev/mesh-of`).
    pub routes: Vec<ConfigMap>,
    /// Locks on target Services (`<svc>-kt-lock`).
    pub locks: Vec<Lease>,
}

/// One thing to undo or remove.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Give a Service its original selector back (taken by `holder`).
    Selector { service: String, holder: Holder },
    /// Give a Deployment its replicas back.
    Replicas { deployment: String, holder: Holder },
    /// Delete a session's anchor; garbage collection removes the rest of its objects.
    Session(Anchor),
    /// Delete a lock no live session holds.
    Lock { name: String },
}

impl Step {
    /// The line that says what the step does (`done`) or would do.
    pub fn describe(&self, done: bool) -> String {
        let (restored, removed) = if done {
            ("Restored", "Removed")
        } else {
            ("Would restore", "Would remove")
        };
        match self {
            Step::Selector { service, holder } => {
                let by = if holder.session == changes::BY_MESH_ROUTER {
                    "meshed".to_string()
                } else {
                    format!("taken by {holder}")
                };
                format!("{restored} the selector of service '{service}' ({by})")
            }
            Step::Replicas { deployment, holder } => format!(
                "{restored} the replicas of deployment '{deployment}' (scaled to 0 by {holder})"
            ),
            Step::Session(a) => {
                let idle = a
                    .idle_secs
                    .map(|s| format!(", silent for {}", human_secs(s)))
                    .unwrap_or_default();
                format!(
                    "{removed} {}{idle}: lease {} and the objects it owns",
                    a.describe(),
                    a.lease
                )
            }
            Step::Lock { name } => format!("{removed} lock {name}"),
        }
    }
}

fn human_secs(s: i64) -> String {
    match s {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

/// Why `recover` does nothing: a session that still holds the Service is alive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alive(pub Box<Anchor>);

impl std::fmt::Display for Alive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let a = &self.0;
        write!(
            f,
            "{} is alive (renewed {} ago): end it where it runs (Ctrl-C), or wait; once it is silent for {}s its shadow restores what it changed",
            a.describe(),
            a.idle_secs
                .map(human_secs)
                .unwrap_or_else(|| "recently".into()),
            a.grace_secs
        )
    }
}

fn holder_of<K: kube::Resource>(obj: &K) -> Option<Holder> {
    changes::holder(obj.meta().annotations.as_ref())
}

/// An object's name (empty when it has none).
pub(crate) fn name_of<K: kube::Resource>(obj: &K) -> String {
    obj.meta().name.clone().unwrap_or_default()
}

/// One of an object's labels.
pub(crate) fn label<'a, K: kube::Resource>(obj: &'a K, key: &str) -> Option<&'a str> {
    obj.meta().labels.as_ref()?.get(key).map(String::as_str)
}

impl Survey {
    /// Reads the namespace (five list calls) and the API server's clock.
    pub async fn take(kube: &Kube) -> Result<Survey, ClusterError> {
        let ns = &kube.namespace;
        let c = &kube.client;
        let (anchors, locks) = sessions(kube).await?;
        let recorded = |a: Option<&BTreeMap<String, String>>| {
            a.is_some_and(|a| a.contains_key(changes::CHANGED_BY))
        };
        let services = Api::<Service>::namespaced(c.clone(), ns)
            .list(&ListParams::default())
            .await
            .map_err(|e| ClusterError::api("listing services", e))?;
        let deployments = Api::<Deployment>::namespaced(c.clone(), ns)
            .list(&ListParams::default())
            .await
            .map_err(|e| ClusterError::api("listing deployments", e))?;
        Ok(Survey {
            anchors,
            locks,
            services: services.items,
            deployments: deployments
                .items
                .into_iter()
                .filter(|d| recorded(d.metadata.annotations.as_ref()))
                .collect(),
            routes: routes(kube).await?,
        })
    }

    fn anchor(&self, id: &str) -> Option<&Anchor> {
        self.anchors.iter().find(|a| a.id == id)
    }

    /// Whether session `id` is alive by `alive` (a session without an anchor is not).
    fn is_alive(&self, id: &str, alive: &impl Fn(&Anchor) -> bool) -> bool {
        self.anchor(id).is_some_and(alive)
    }

    /// The sessions that own a lock (their anchors' names, mapped back to ids).
    fn lock_owners(&self, lock: &Lease) -> Vec<String> {
        lock.metadata
            .owner_references
            .iter()
            .flatten()
            .filter(|r| r.kind == "Lease")
            .map(|r| {
                self.anchors
                    .iter()
                    .find(|a| a.lease == r.name)
                    .map(|a| a.id.clone())
                    .unwrap_or_else(|| r.name.trim_start_matches("ktctl-").to_string())
            })
            .collect()
    }

    /// Sessions with a mesh route on `service`.
    fn meshing(&self, service: &str) -> Vec<String> {
        self.routes
            .iter()
            .filter(|r| label(*r, changes::MESH_OF) == Some(service))
            .filter_map(|r| label(r, SESSION_LABEL).map(str::to_string))
            .collect()
    }

    /// Every change and object of sessions that are not alive by `alive`: the steps of
    /// `ktctl clean`. Changes of live sessions, and meshes with a live developer, are left.
    pub fn clean(&self, alive: impl Fn(&Anchor) -> bool) -> Vec<Step> {
        let mut steps = vec![];
        for s in &self.services {
            let Some(h) = holder_of(s) else { continue };
            let name = name_of(s);
            let dead = if h.session == changes::BY_MESH_ROUTER {
                !self
                    .meshing(&name)
                    .iter()
                    .any(|id| self.is_alive(id, &alive))
            } else {
                !self.is_alive(&h.session, &alive)
            };
            if dead {
                steps.push(Step::Selector {
                    service: name,
                    holder: h,
                });
            }
        }
        for d in &self.deployments {
            let Some(h) = holder_of(d) else { continue };
            if !self.is_alive(&h.session, &alive) {
                steps.push(Step::Replicas {
                    deployment: name_of(d),
                    holder: h,
                });
            }
        }
        for a in &self.anchors {
            if !alive(a) {
                steps.push(Step::Session(a.clone()));
            }
        }
        for l in &self.locks {
            if !self
                .lock_owners(l)
                .iter()
                .any(|id| self.is_alive(id, &alive))
            {
                steps.push(Step::Lock { name: name_of(l) });
            }
        }
        steps
    }

    /// The steps of `ktctl recover <service>`: every change on the Service and on the
    /// Deployments scaled by the sessions that hold it, those sessions and the lock. Refused if
    /// any of those sessions is alive by `alive`.
    pub fn recover(
        &self,
        service: &str,
        alive: impl Fn(&Anchor) -> bool,
    ) -> Result<Vec<Step>, Alive> {
        let lock_name = format!("{service}-kt-lock");
        let lock = self.locks.iter().find(|l| name_of(*l) == lock_name);
        let svc = self.services.iter().find(|s| name_of(*s) == service);
        let mut sessions: BTreeSet<String> = self.meshing(service).into_iter().collect();
        if let Some(l) = lock {
            sessions.extend(self.lock_owners(l));
        }
        let svc_holder = svc.and_then(holder_of);
        if let Some(h) = &svc_holder
            && h.session != changes::BY_MESH_ROUTER
        {
            sessions.insert(h.session.clone());
        }
        for id in &sessions {
            if let Some(a) = self.anchor(id)
                && alive(a)
            {
                return Err(Alive(Box::new(a.clone())));
            }
        }
        let mut steps = vec![];
        if let Some(h) = svc_holder {
            steps.push(Step::Selector {
                service: service.to_string(),
                holder: h,
            });
        }
        for d in &self.deployments {
            if let Some(h) = holder_of(d)
                && sessions.contains(&h.session)
            {
                steps.push(Step::Replicas {
                    deployment: name_of(d),
                    holder: h,
                });
            }
        }
        for id in &sessions {
            if let Some(a) = self.anchor(id) {
                steps.push(Step::Session(a.clone()));
            }
        }
        if lock.is_some() {
            steps.push(Step::Lock { name: lock_name });
        }
        Ok(steps)
    }
}

/// The namespace's sessions (their anchors, read on the API server's clock) and locks.
pub async fn sessions(kube: &Kube) -> Result<(Vec<Anchor>, Vec<Lease>), ClusterError> {
    let ours = ListParams::default().labels(&format!("{MANAGED_BY}=ktctl"));
    let leases = Api::<Lease>::namespaced(kube.client.clone(), &kube.namespace)
        .list(&ours)
        .await
        .map_err(|e| ClusterError::api("listing ktctl's leases", e))?;
    let now = session::server_now(&kube.client).await?;
    let role = |l: &Lease, r: &str| label(l, ROLE_LABEL) == Some(r);
    let anchors = leases
        .items
        .iter()
        .filter(|l| role(l, "anchor"))
        .map(|l| Anchor::from_lease(l, now))
        .collect();
    let locks = leases
        .items
        .into_iter()
        .filter(|l| role(l, "lock"))
        .collect();
    Ok((anchors, locks))
}

/// The namespace's mesh routes that are not being deleted.
pub async fn routes(kube: &Kube) -> Result<Vec<ConfigMap>, ClusterError> {
    Ok(
        Api::<ConfigMap>::namespaced(kube.client.clone(), &kube.namespace)
            .list(&ListParams::default().labels(changes::MESH_OF))
            .await
            .map_err(|e| ClusterError::api("listing mesh routes", e))?
            .items
            .into_iter()
            .filter(|r| r.metadata.deletion_timestamp.is_none())
            .collect(),
    )
}

/// Runs one step. `Ok(false)`: nothing was left to do (someone else did it meanwhile).
pub async fn apply(kube: &Kube, step: &Step) -> Result<bool, ClusterError> {
    let c = &kube.client;
    let ns = &kube.namespace;
    let modify_error = |what: String| {
        move |e: ModifyError<changes::UndoError>| match e {
            ModifyError::Refused(e) => ClusterError::Shadow(e.to_string()),
            ModifyError::Api(e) => ClusterError::api(what, e),
        }
    };
    match step {
        Step::Selector { service, holder } => {
            let mut done = false;
            changes::modify(
                &Api::<Service>::namespaced(c.clone(), ns),
                service,
                |s: &mut Service| {
                    done = changes::undo_selector(s, Some(&holder.session))?;
                    Ok(done)
                },
            )
            .await
            .map_err(modify_error(format!("restoring service {service}")))?;
            Ok(done)
        }
        Step::Replicas { deployment, holder } => {
            let mut done = false;
            changes::modify(
                &Api::<Deployment>::namespaced(c.clone(), ns),
                deployment,
                |d: &mut Deployment| {
                    done = changes::undo_replicas(d, Some(&holder.session)).is_some();
                    Ok(done)
                },
            )
            .await
            .map_err(modify_error(format!("restoring deployment {deployment}")))?;
            Ok(done)
        }
        Step::Session(a) => delete_lease(kube, &a.lease).await,
        Step::Lock { name } => delete_lease(kube, name).await,
    }
}

async fn delete_lease(kube: &Kube, name: &str) -> Result<bool, ClusterError> {
    match Api::<Lease>::namespaced(kube.client.clone(), &kube.namespace)
        .delete(name, &DeleteParams::background())
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(ClusterError::api(format!("deleting lease {name}"), e)),
    }
}

#[cfg(test)]
mod tests;
