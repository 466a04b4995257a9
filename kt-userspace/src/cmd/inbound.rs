//! What the inbound commands (`exchange`, `mesh`, `preview`) share: their targets, the checks
//! made before anything changes in the cluster, the lock on a target Service, the banner, and
//! the wait for the end.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Api;
use kube::api::ListParams;

use crate::cli::{Expose, PortMap};
use crate::cluster::session::{Kind, Session};
use crate::cluster::{ClusterError, Kube, Permission, perm};
use crate::error::{EnvError, Error, Result};
use crate::interrupt::{self, Interrupts};
use crate::tunnel::Tunnel;

/// The dashed lines around kt-connect's banners.
pub const DASHES: &str = "---------------------------------------------------------------";

/// Prints a banner as kt-connect does: the text between two dashed lines.
pub fn banner(text: &str) {
    tracing::info!("{DASHES}");
    tracing::info!(" {text}");
    tracing::info!("{DASHES}");
}

/// What exchange, mesh and preview need beyond connect's permissions.
pub const INBOUND_PERMISSIONS: &[Permission] = &[
    // The target Service: read, its selector taken and restored (the shadow's Role grants
    // get/update on it, which RBAC lets only a holder grant); previews and routes created.
    perm("get", "", "services"),
    perm("update", "", "services"),
    perm("create", "", "services"),
    perm("delete", "", "services"),
    // Scale mode.
    perm("get", "apps", "deployments"),
    perm("update", "apps", "deployments"),
    perm("list", "apps", "deployments"),
    // Mesh routes.
    perm("create", "", "configmaps"),
    perm("delete", "", "configmaps"),
    perm("list", "", "configmaps"),
    perm("watch", "", "configmaps"),
];

/// A command's target, in kt-connect's forms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Service(String),
    Deployment(String),
    Pod(String),
}

impl Target {
    /// `<svc>`, `service/<svc>`, `svc/<svc>`, `deployment/<name>`, `deploy/<name>`,
    /// `pod/<name>`.
    pub fn parse(s: &str) -> std::result::Result<Target, EnvError> {
        let (kind, name) = match s.split_once('/') {
            Some((k, n)) => (k, n),
            None => ("service", s),
        };
        if name.is_empty() || !is_dns_name(name) {
            return Err(EnvError::new(format!(
                "{s:?} is not a valid target: give <service>, service/<name>, deployment/<name> or pod/<name> (names are lowercase DNS labels)"
            )));
        }
        match kind {
            "service" | "svc" | "services" => Ok(Target::Service(name.into())),
            "deployment" | "deploy" | "deployments" => Ok(Target::Deployment(name.into())),
            "pod" | "pods" | "po" => Ok(Target::Pod(name.into())),
            other => Err(EnvError::new(format!(
                "{s:?}: unknown kind {other:?}; give <service>, service/<name>, deployment/<name> or pod/<name>"
            ))),
        }
    }

    /// The kind as kt-connect's banners name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Service(_) => "service",
            Target::Deployment(_) => "deployment",
            Target::Pod(_) => "pod",
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Target::Service(n) | Target::Deployment(n) | Target::Pod(n) => n,
        }
    }
}

/// An RFC 1123 DNS subdomain-ish name, as Kubernetes object names are.
pub fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
}

fn not_found(kind: &str, name: &str, ns: &str) -> Error {
    EnvError::new(format!("{kind} '{name}' not found in namespace {ns}")).into()
}

/// Reads an object; a missing one is a usage error naming it.
async fn get<K>(api: &Api<K>, kind: &str, name: &str, ns: &str) -> Result<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.get_opt(name)
        .await
        .map_err(|e| ClusterError::api(format!("reading {kind} {name}"), e))?
        .ok_or_else(|| not_found(kind, name, ns))
}

/// Whether `selector` selects pods labelled `labels`.
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The pod labels a target's traffic is addressed to: a Deployment's template labels or a
/// pod's labels (None for a Service).
async fn workload_labels(kube: &Kube, target: &Target) -> Result<Option<BTreeMap<String, String>>> {
    let ns = &kube.namespace;
    Ok(match target {
        Target::Service(_) => None,
        Target::Deployment(n) => {
            let d = get(
                &Api::<Deployment>::namespaced(kube.client.clone(), ns),
                "deployment",
                n,
                ns,
            )
            .await?;
            Some(
                d.spec
                    .template
                    .metadata
                    .and_then(|m| m.labels)
                    .unwrap_or_default(),
            )
        }
        Target::Pod(n) => {
            let p = get(
                &Api::<Pod>::namespaced(kube.client.clone(), ns),
                "pod",
                n,
                ns,
            )
            .await?;
            Some(p.metadata.labels.unwrap_or_default())
        }
    })
}

/// The Service a target's traffic comes through: the Service itself, or the one Service that
/// selects the Deployment's or pod's pods.
pub async fn service_of(kube: &Kube, target: &Target) -> Result<Service> {
    let ns = &kube.namespace;
    let api = Api::<Service>::namespaced(kube.client.clone(), ns);
    let Some(labels) = workload_labels(kube, target).await? else {
        return get(&api, "service", target.name(), ns).await;
    };
    let services = api
        .list(&ListParams::default())
        .await
        .map_err(|e| ClusterError::api("listing services", e))?;
    let mut matching: Vec<Service> = services
        .items
        .into_iter()
        .filter(|s| {
            s.spec
                .as_ref()
                .and_then(|s| s.selector.as_ref())
                .is_some_and(|sel| selects(sel, &labels))
        })
        .filter(|s| {
            // Not ktctl's own Services (previews, routes, stuntmen).
            s.metadata
                .labels
                .as_ref()
                .is_none_or(|l| !l.contains_key(crate::cluster::session::MANAGED_BY))
        })
        .collect();
    // A headless companion (for StatefulSets, DNS-based discovery) next to the Service that
    // carries the traffic is common: when it makes the choice ambiguous, the Service with a
    // ClusterIP is the target.
    if matching.len() > 1 {
        let with_ip: Vec<Service> = matching
            .iter()
            .filter(|s| !is_headless(s))
            .cloned()
            .collect();
        if with_ip.len() == 1 {
            matching = with_ip;
        }
    }
    match matching.len() {
        1 => Ok(matching.remove(0)),
        0 => Err(EnvError::new(format!(
            "no Service in namespace {ns} selects the pods of {}/{}",
            target.kind(),
            target.name()
        ))
        .into()),
        _ => Err(EnvError::new(format!(
            "several Services select the pods of {}/{}: {}; name one as service/<name>",
            target.kind(),
            target.name(),
            matching
                .iter()
                .filter_map(|s| s.metadata.name.clone())
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .into()),
    }
}

fn is_headless(s: &Service) -> bool {
    s.spec
        .as_ref()
        .and_then(|s| s.cluster_ip.as_deref())
        .is_some_and(|ip| ip == "None")
}

/// The Service's selector; a Service without one (its endpoints are managed by hand) cannot
/// be taken over.
pub fn selector_of(svc: &Service) -> std::result::Result<BTreeMap<String, String>, EnvError> {
    let name = svc.metadata.name.clone().unwrap_or_default();
    match svc.spec.as_ref().and_then(|s| s.selector.clone()) {
        Some(sel) if !sel.is_empty() => Ok(sel),
        _ => Err(EnvError::new(format!(
            "service '{name}' has no selector (its endpoints are set by hand), so its traffic cannot be redirected"
        ))),
    }
}

/// The ports the Service's traffic arrives on at its pods (numeric target ports, or the port
/// itself when there is none); named target ports are matched by number against `remote` as
/// given.
pub fn target_ports(svc: &Service) -> Vec<u16> {
    svc.spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default()
        .iter()
        .filter_map(|p| match &p.target_port {
            Some(IntOrString::Int(t)) => u16::try_from(*t).ok(),
            Some(IntOrString::String(_)) => None,
            None => u16::try_from(p.port).ok(),
        })
        .collect()
}

/// Every remote port of `--expose` must be one the Service sends traffic to.
pub fn check_remote_ports(svc: &Service, expose: &Expose) -> std::result::Result<(), EnvError> {
    let name = svc.metadata.name.clone().unwrap_or_default();
    let ports = target_ports(svc);
    let named = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .is_some_and(|ps| {
            ps.iter()
                .any(|p| matches!(p.target_port, Some(IntOrString::String(_))))
        });
    for m in &expose.0 {
        if !ports.contains(&m.remote) && !named {
            let have: Vec<String> = ports.iter().map(u16::to_string).collect();
            return Err(EnvError::new(format!(
                "--expose {m}: service '{name}' has no port {} (its target ports: {}); give local:remote with one of them",
                m.remote,
                have.join(", ")
            )));
        }
    }
    Ok(())
}

/// Checks that something listens on each local port, unless `skip`: a closed port is found
/// now, not by the first caller in the cluster.
pub async fn check_local_ports(expose: &Expose, skip: bool) -> std::result::Result<(), EnvError> {
    if skip {
        return Ok(());
    }
    for m in &expose.0 {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], m.local));
        match tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
            .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(EnvError::new(format!(
                    "--expose {m}: nothing accepts connections on 127.0.0.1:{} ({e}); start your local service first, or pass --skipPortChecking",
                    m.local
                )));
            }
            Err(_) => {
                return Err(EnvError::new(format!(
                    "--expose {m}: 127.0.0.1:{} did not accept a connection within 2 s; pass --skipPortChecking to start anyway",
                    m.local
                )));
            }
        }
    }
    Ok(())
}

/// The remote ports of `--expose`.
pub fn remote_ports(expose: &Expose) -> Vec<u16> {
    expose.0.iter().map(|m: &PortMap| m.remote).collect()
}

/// How a session holds a target Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// One session alone (exchange).
    Exclusive,
    /// Shared with other meshing sessions.
    Mesh,
    /// Shared with other sessions meshing through the router DaemonSet (`mesh --mode ebpf`).
    MeshEbpf,
}

impl LockMode {
    fn as_str(self) -> &'static str {
        match self {
            LockMode::Exclusive => "exchange",
            LockMode::Mesh => "mesh",
            LockMode::MeshEbpf => "mesh-ebpf",
        }
    }

    fn shared(self) -> bool {
        self != LockMode::Exclusive
    }
}

pub(crate) const LOCK_MODE: &str = "kt.dev/lock-mode";

/// The lock Lease of a Service.
pub fn lock_name(svc: &str) -> String {
    format!("{svc}-kt-lock")
}

/// Who holds the lock, for the error.
fn describe_holder(l: &Lease) -> String {
    let a = l.metadata.annotations.clone().unwrap_or_default();
    let get = |k: &str| a.get(k).cloned().unwrap_or_else(|| "?".into());
    format!(
        "{} by {} (session {}) since {}",
        get(LOCK_MODE),
        get(kt_common::changes::CHANGED_BY_OWNER),
        get(kt_common::changes::CHANGED_BY),
        get(kt_common::changes::CHANGED_AT)
    )
}

/// Fails if another session holds `svc` in a way that conflicts with `mode` (read only: made
/// before anything is created, so a conflict costs nothing).
pub async fn check_lock(kube: &Kube, svc: &str, mode: LockMode) -> Result<()> {
    let api = Api::<Lease>::namespaced(kube.client.clone(), &kube.namespace);
    let lock = api
        .get_opt(&lock_name(svc))
        .await
        .map_err(|e| ClusterError::api(format!("reading lease {}", lock_name(svc)), e))?;
    if let Some(l) = lock {
        conflict(&l, svc, mode)?;
    }
    Ok(())
}

fn conflict(l: &Lease, svc: &str, mode: LockMode) -> Result<()> {
    if l.metadata.deletion_timestamp.is_some() {
        return Ok(());
    }
    let theirs = l
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LOCK_MODE))
        .map(String::as_str);
    if mode.shared() && theirs == Some(mode.as_str()) {
        return Ok(());
    }
    Err(Error::Runtime(format!(
        "service '{svc}' is already taken: {}. Wait for that session to end, or run `ktctl recover {svc}` if it is gone",
        describe_holder(l)
    )))
}

/// Takes the lock on `svc` for the session: a Lease owned by the session's anchor, so it ends
/// with the session however the session ends. Meshing sessions share one lock (each adds
/// itself as an owner).
pub async fn take_lock(session: &Session, kube: &Kube, svc: &str, mode: LockMode) -> Result<()> {
    let api = Api::<Lease>::namespaced(kube.client.clone(), &kube.namespace);
    let name = lock_name(svc);
    let mut meta = session.meta(&name, "lock");
    meta.annotations = Some(BTreeMap::from([
        (LOCK_MODE.to_string(), mode.as_str().to_string()),
        (
            kt_common::changes::CHANGED_BY.to_string(),
            session.id.clone(),
        ),
        (
            kt_common::changes::CHANGED_BY_OWNER.to_string(),
            session.owner.clone(),
        ),
        (
            kt_common::changes::CHANGED_AT.to_string(),
            session.since.clone(),
        ),
    ]));
    if mode.shared() {
        // Shared: no single controller.
        if let Some(refs) = meta.owner_references.as_mut() {
            for r in refs {
                r.controller = None;
            }
        }
    }
    let lease = Lease {
        metadata: meta,
        spec: Some(LeaseSpec {
            holder_identity: Some(session.id.clone()),
            ..Default::default()
        }),
    };
    // An exclusive lock is the session's to delete at its end; a shared one goes by garbage
    // collection once the last of its owners (the meshing sessions' anchors) is gone, never
    // with the first session to leave.
    let created = match mode {
        LockMode::Exclusive => session.create(Kind::Lease, &lease).await.map(|_| ()),
        LockMode::Mesh | LockMode::MeshEbpf => api
            .create(&kube::api::PostParams::default(), &lease)
            .await
            .map(|_| ())
            .map_err(|e| ClusterError::api(format!("creating lease {name}"), e)),
    };
    match created {
        Ok(()) => return Ok(()),
        Err(ClusterError::Api {
            source: kube::Error::Api(s),
            ..
        }) if s.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    // Someone holds it: a conflict, or a mesh lock this session joins.
    let owner = session.owner_reference();
    let joined = kt_common::changes::modify(&api, &name, |l: &mut Lease| {
        conflict(l, svc, mode).map_err(|e| e.to_string())?;
        let refs = l.metadata.owner_references.get_or_insert_with(Vec::new);
        if refs.iter().any(|r| r.uid == owner.uid) {
            return Ok(false);
        }
        refs.push(OwnerReference {
            controller: None,
            ..owner.clone()
        });
        Ok(true)
    })
    .await;
    match joined {
        Ok(_) => Ok(()),
        Err(kt_common::changes::ModifyError::Refused(msg)) => Err(Error::Runtime(msg)),
        Err(kt_common::changes::ModifyError::Api(e)) => {
            Err(ClusterError::api(format!("joining lease {name}"), e).into())
        }
    }
}

/// Before an inbound command changes anything: what sessions that are gone left behind
/// (anchors silent for twice their grace) is undone and removed, as `ktctl clean` does, so
/// that a dead session's lock or selector does not stand in the way. `skip`: `--skipCleanup`.
pub async fn clean_dead(kube: &Kube, skip: bool) -> Result<()> {
    if skip {
        return Ok(());
    }
    let survey = crate::cluster::leftovers::Survey::take(kube).await?;
    for step in survey.clean(|a| a.alive_within(2 * a.grace_secs)) {
        match crate::cluster::leftovers::apply(kube, &step).await {
            Ok(true) => tracing::info!("{}", step.describe(true)),
            Ok(false) => {}
            Err(e) => tracing::warn!("{}: {e}", step.describe(false)),
        }
    }
    Ok(())
}

/// Waits for the end of an inbound command: a signal (returned as [`Error::Interrupted`]).
pub async fn until_interrupted(interrupts: &Interrupts, mark: u64) -> Error {
    Error::Interrupted(interrupts.after(mark).await)
}

/// How an inbound command's body ends: a signal is the normal end (exit 0, saying which
/// signal); any other error is the command's.
pub fn ended(why: Error) -> Result<u8> {
    match why {
        Error::Interrupted(sig) => {
            tracing::info!("{}", interrupt::describe(sig));
            Ok(0)
        }
        e => Err(e),
    }
}

/// Exposes every `--expose` mapping through the session's tunnel (replayed after reconnects).
pub async fn expose_all(tunnel: &Tunnel, expose: &Expose) -> Result<()> {
    for m in &expose.0 {
        tunnel.expose(m.remote, m.local).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};

    #[test]
    fn targets_parse_in_kt_connects_forms() {
        for (s, t) in [
            ("nginx", Target::Service("nginx".into())),
            ("service/nginx", Target::Service("nginx".into())),
            ("svc/nginx", Target::Service("nginx".into())),
            ("deployment/web", Target::Deployment("web".into())),
            ("deploy/web", Target::Deployment("web".into())),
            ("pod/web-0", Target::Pod("web-0".into())),
        ] {
            assert_eq!(Target::parse(s), Ok(t), "{s}");
        }
        for bad in ["", "Nginx", "job/x", "service/", "-x", "a_b"] {
            assert!(Target::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn svc(ports: &[(i32, Option<IntOrString>)]) -> Service {
        Service {
            metadata: kube::api::ObjectMeta {
                name: Some("nginx".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                ports: Some(
                    ports
                        .iter()
                        .map(|(p, t)| ServicePort {
                            port: *p,
                            target_port: t.clone(),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_remote_port_the_service_does_not_have_is_refused_naming_it() {
        let s = svc(&[(80, Some(IntOrString::Int(8080))), (443, None)]);
        let ok = crate::cli::parse_expose("9000:8080,443").expect("parse");
        check_remote_ports(&s, &ok).expect("both are target ports");
        let bad = crate::cli::parse_expose("80").expect("parse");
        let e = check_remote_ports(&s, &bad).expect_err("80 is the port, not the target port");
        assert!(
            e.0.contains("--expose 80") && e.0.contains("8080, 443"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_closed_local_port_is_refused_unless_checking_is_skipped() {
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let expose = crate::cli::parse_expose(&format!("{free}:80")).expect("parse");
        let e = check_local_ports(&expose, false).await.expect_err("closed");
        assert!(e.0.contains("--skipPortChecking"), "{e}");
        check_local_ports(&expose, true).await.expect("skipped");
        let open = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = open.local_addr().expect("addr").port();
        let expose = crate::cli::parse_expose(&port.to_string()).expect("parse");
        check_local_ports(&expose, false).await.expect("open");
    }

    #[test]
    fn a_mesh_lock_is_shared_only_with_other_meshes() {
        let mut l = Lease::default();
        l.metadata.annotations = Some(BTreeMap::from([
            (LOCK_MODE.to_string(), "mesh".to_string()),
            (
                kt_common::changes::CHANGED_BY_OWNER.to_string(),
                "bob@box".to_string(),
            ),
        ]));
        conflict(&l, "nginx", LockMode::Mesh).expect("meshes share");
        let e = conflict(&l, "nginx", LockMode::Exclusive).expect_err("exchange conflicts");
        assert!(e.to_string().contains("bob@box"), "{e}");
        l.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(LOCK_MODE.into(), "exchange".into());
        assert!(conflict(&l, "nginx", LockMode::Mesh).is_err());
    }
}
