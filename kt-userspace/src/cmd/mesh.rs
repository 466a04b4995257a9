//! `ktctl mesh <svc>`: only requests carrying this developer's header come to local ports; the
//! rest stays in the cluster.
//!
//! auto mode: one router per Service (`<svc>-kt-router`, `kt-router mesh`), shared by every
//! developer who meshes it, takes the Service's selector; the original pods stay behind
//! `<svc>-kt-stuntman`, which holds the original selector. Each developer adds a route, a
//! ConfigMap `<svc>-kt-mesh-<mark>` owned by their session (so it vanishes with it), pointing
//! at a Service of their own that selects their shadow. The shared objects are owned by every
//! meshing session's anchor, so garbage collection removes them with the last one. Whoever
//! leaves last (ktctl on exit, or the shadow of a killed ktctl, or the router itself once no
//! route is left) puts the original selector back.
//!
//! manual mode: a shadow carrying the workload's labels plus `<key>=<mark>`, for the user's
//! own Istio rules; nothing else changes.
//!
//! ebpf mode: the router DaemonSet (deploy/router.yaml) does the routing inside the nodes. The
//! shadow is labelled `kt.dev/mesh-ebpf=<svc>` and annotated with the header and value; every
//! node's router steers the Service's TCP traffic (ClusterIP and pod IPs) to a mesh proxy of
//! its own, which sends the requests carrying the header to the shadow and the rest where they
//! were going. Nothing in the Service or its workload changes; the session's end (or its
//! shadow's) ends the route.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Affinity, ConfigMap, Container, EnvVar, EnvVarSource, ObjectFieldSelector, Pod, PodAffinity,
    PodAffinityTerm, PodSpec, Probe, Service, ServiceAccount, ServicePort, ServiceSpec,
    TCPSocketAction, WeightedPodAffinityTerm,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kt_common::changes::{self, Holder};
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Signals;
use super::inbound::{self, LockMode, Target};
use crate::cli::{Global, MeshArgs, MeshMode};
use crate::cluster::session::{Kind, MANAGED_BY, ROLE_LABEL, SESSION_LABEL, Session};
use crate::cluster::shadow::{self, HEALTH_PORT};
use crate::cluster::{CONNECT_PERMISSIONS, ClusterError, Kube};
use crate::error::{EnvError, Error, Result};
use crate::interrupt::Interrupts;

const ROLE: &str = "shadow-mesh";
/// The label of route ConfigMaps: the meshed Service (kt-router mesh's `--service`).
pub const MESH_OF: &str = changes::MESH_OF;
/// The role label of the shared router.
const ROUTER_ROLE: &str = "mesh-router";

/// A parsed `--versionMark`: the header (or label) key and the value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mark {
    pub key: String,
    pub value: String,
}

/// `key:val`, `val` (key `version`) or `key:` (a random value); nothing: `version` and a
/// random value. The key must be a valid HTTP header name and the value a valid header value
/// (and, in manual mode, a label value).
pub fn parse_mark(s: Option<&str>, manual: bool) -> std::result::Result<Mark, EnvError> {
    let (key, value) = match s {
        None => ("version".to_string(), String::new()),
        Some(s) => match s.split_once(':') {
            Some((k, v)) => (k.trim().to_string(), v.trim().to_string()),
            None => ("version".to_string(), s.trim().to_string()),
        },
    };
    let value = if value.is_empty() {
        random_mark()
    } else {
        value
    };
    if key.is_empty() || http::HeaderName::from_bytes(key.as_bytes()).is_err() {
        return Err(EnvError::new(format!(
            "--versionMark: {key:?} is not a valid HTTP header name (letters, digits and !#$%&'*+-.^_`|~)"
        )));
    }
    if http::HeaderValue::from_str(&value).is_err() || value.chars().any(char::is_whitespace) {
        return Err(EnvError::new(format!(
            "--versionMark: {value:?} is not a valid HTTP header value (visible ASCII, no spaces)"
        )));
    }
    let label_ok = value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && value
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && value
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    if !label_ok {
        return Err(EnvError::new(format!(
            "--versionMark: {value:?} must also work as a label value and part of object names: up to 63 of [A-Za-z0-9-], starting and ending alphanumeric"
        )));
    }
    if manual
        && !key.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
        })
    {
        return Err(EnvError::new(format!(
            "--versionMark: {key:?} must be a lowercase label key in manual mode"
        )));
    }
    Ok(Mark { key, value })
}

/// Five random lowercase letters, as kt-connect makes them.
fn random_mark() -> String {
    let mut bytes = [0u8; 5];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_err()
    {
        bytes = (std::process::id() as u64 * 2_654_435_761).to_le_bytes()[..5]
            .try_into()
            .unwrap_or([7; 5]);
    }
    bytes.iter().map(|b| (b'a' + b % 26) as char).collect()
}

pub async fn run(global: &Global, args: &MeshArgs) -> Result<u8> {
    let target = Target::parse(&args.target)?;
    if let Target::Pod(_) = target {
        return Err(EnvError::new("mesh takes a Service or deployment/<name>, not a pod").into());
    }
    let manual = args.mode == MeshMode::Manual;
    let ebpf = args.mode == MeshMode::Ebpf;
    let lock = if ebpf {
        LockMode::MeshEbpf
    } else {
        LockMode::Mesh
    };
    let mark = parse_mark(args.version_mark.as_deref(), manual)?;
    let expose = &args.expose.expose;
    let kube = super::connect_kube(global).await?;
    kube.require(CONNECT_PERMISSIONS).await?;
    kube.require_from(inbound::INBOUND_PERMISSIONS, "deploy/rbac-inbound.yaml")
        .await?;
    let svc = inbound::service_of(&kube, &target).await?;
    let svc_name = svc.metadata.name.clone().unwrap_or_default();
    let selector = inbound::selector_of(&svc)?;
    inbound::check_remote_ports(&svc, expose)?;
    if ebpf {
        crate::cluster::router::require(&kube, "mesh --mode ebpf").await?;
    }
    inbound::check_local_ports(expose, args.expose.skip_port_checking).await?;
    inbound::clean_dead(&kube, args.session.skip_cleanup).await?;
    let name = route_name(&svc_name, &mark);
    if name.len() > 63 {
        return Err(EnvError::new(format!(
            "--versionMark: {:?} makes the name {name} longer than Kubernetes' 63 characters; use a shorter mark",
            mark.value
        ))
        .into());
    }
    if manual || ebpf {
        let taken = Api::<Pod>::namespaced(kube.client.clone(), &kube.namespace)
            .get_opt(&name)
            .await
            .map_err(|e| ClusterError::api("reading the shadow pods", e))?;
        if taken.is_some() {
            return Err(EnvError::new(format!(
                "another developer meshes service '{svc_name}' with mark '{}' already (pod {name}); choose another --versionMark",
                mark.value
            ))
            .into());
        }
    }
    if !manual {
        inbound::check_lock(&kube, &svc_name, lock).await?;
    }
    if !manual && !ebpf {
        let route = Api::<ConfigMap>::namespaced(kube.client.clone(), &kube.namespace)
            .get_opt(&route_name(&svc_name, &mark))
            .await
            .map_err(|e| ClusterError::api("reading the mesh routes", e))?;
        if route.is_some() {
            return Err(EnvError::new(format!(
                "another developer meshes service '{svc_name}' with mark '{}' already; choose another --versionMark",
                mark.value
            ))
            .into());
        }
    }
    let mut opts = super::shadow_options(global)?;
    opts.ports = inbound::remote_ports(expose);
    opts.name = Some(route_name(&svc_name, &mark));
    if !manual && !ebpf {
        // If this ktctl dies, its shadow puts the selector back when no other session meshes.
        opts.restore = vec![format!("mesh/{svc_name}")];
    }
    if ebpf {
        opts.labels = BTreeMap::from([(changes::MESH_EBPF.to_string(), svc_name.clone())]);
        opts.user_annotations
            .insert(changes::MESH_HEADER.to_string(), mark.key.clone());
        opts.user_annotations
            .insert(changes::MESH_VALUE.to_string(), mark.value.clone());
    }
    if manual {
        let mut labels = selector.clone();
        labels.insert(mark.key.clone(), mark.value.clone());
        opts.labels = labels;
    }
    let interrupts = Interrupts::install("mesh").map_err(|e| Error::io("handling signals", e))?;
    let mark_n = interrupts.count();
    let router_image = args
        .router_image
        .clone()
        .unwrap_or_else(|| global.image.clone());
    super::with_shadow(
        &kube,
        &opts,
        "mesh",
        Duration::from_secs(args.session.grace),
        Duration::from_secs(global.port_forward_timeout),
        &interrupts,
        Signals::Body,
        async |session, tunnel| {
            inbound::expose_all(tunnel, expose).await?;
            if manual {
                let dashes = "-".repeat(57);
                tracing::info!("{dashes}");
                tracing::info!(
                    " Now you can update Istio rule by label '{}={}' ",
                    mark.key,
                    mark.value
                );
                tracing::info!("{dashes}");
                return inbound::ended(inbound::until_interrupted(&interrupts, mark_n).await);
            }
            inbound::take_lock(session, &kube, &svc_name, lock).await?;
            if ebpf {
                // The routers route as soon as the shadow is ready, which it is by now.
                inbound::banner(&format!(
                    "Now you can access your service by header '{}: {}' ",
                    mark.key.to_uppercase(),
                    mark.value
                ));
                return inbound::ended(inbound::until_interrupted(&interrupts, mark_n).await);
            }
            let meshed = Meshed {
                kube: &kube,
                session,
                svc: &svc,
                name: &svc_name,
                original: &selector,
                mark: &mark,
                image: &router_image,
                ports: inbound::remote_ports(expose),
                opts: &opts,
            };
            let r = async {
                meshed.route().await?;
                meshed.router().await?;
                meshed.take_service().await
            }
            .await;
            let ended = match r {
                Ok(()) => {
                    inbound::banner(&format!(
                        "Now you can access your service by header '{}: {}' ",
                        mark.key.to_uppercase(),
                        mark.value
                    ));
                    inbound::until_interrupted(&interrupts, mark_n).await
                }
                Err(e) => e,
            };
            meshed.leave().await;
            inbound::ended(ended)
        },
    )
    .await
}

fn route_name(svc: &str, mark: &Mark) -> String {
    format!("{svc}-kt-mesh-{}", mark.value.to_lowercase())
}

/// One developer's mesh of one Service.
struct Meshed<'a> {
    kube: &'a Kube,
    session: &'a Session,
    svc: &'a Service,
    name: &'a str,
    original: &'a BTreeMap<String, String>,
    mark: &'a Mark,
    image: &'a str,
    ports: Vec<u16>,
    /// The shadows' options: the router obeys the same node selector, pull secret, pull
    /// policy and user labels and annotations.
    opts: &'a shadow::ShadowOptions,
}

impl Meshed<'_> {
    fn router_name(&self) -> String {
        format!("{}-kt-router", self.name)
    }

    fn stuntman_name(&self) -> String {
        format!("{}-kt-stuntman", self.name)
    }

    fn router_labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (MANAGED_BY.to_string(), "ktctl".to_string()),
            (ROLE_LABEL.to_string(), ROUTER_ROLE.to_string()),
            (MESH_OF.to_string(), self.name.to_string()),
        ])
    }

    /// The developer's Service (selecting their shadow) and route ConfigMap.
    async fn route(&self) -> Result<()> {
        let name = route_name(self.name, self.mark);
        let svc = Service {
            metadata: self.session.meta(&name, "mesh-target"),
            spec: Some(ServiceSpec {
                selector: Some(BTreeMap::from([
                    (SESSION_LABEL.to_string(), self.session.id.clone()),
                    (ROLE_LABEL.to_string(), ROLE.to_string()),
                ])),
                ports: Some(self.ports.iter().map(|p| port(*p, *p)).collect()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let created = self.session.create(Kind::Service, &svc).await?;
        let ip = created
            .spec
            .and_then(|s| s.cluster_ip)
            .filter(|ip| !ip.is_empty() && ip != "None")
            .ok_or_else(|| Error::Runtime(format!("service {name} got no ClusterIP")))?;
        let mut meta = self.session.meta(&name, "mesh-route");
        meta.labels
            .get_or_insert_with(BTreeMap::new)
            .insert(MESH_OF.into(), self.name.to_string());
        let cm = ConfigMap {
            metadata: meta,
            data: Some(BTreeMap::from([
                ("header".to_string(), self.mark.key.clone()),
                ("value".to_string(), self.mark.value.clone()),
                ("target".to_string(), ip),
            ])),
            ..Default::default()
        };
        self.session.create(Kind::ConfigMap, &cm).await?;
        tracing::info!(
            "Route {name}: requests with header '{}: {}' go to this machine",
            self.mark.key,
            self.mark.value
        );
        Ok(())
    }

    /// Starts the shared router if it is not running, or joins it (adds this session as an
    /// owner of its objects, so they live while any meshing session does).
    async fn router(&self) -> Result<()> {
        let ns = &self.kube.namespace;
        let client = &self.kube.client;
        let owner = OwnerReference {
            controller: None,
            ..self.session.owner_reference()
        };
        let meta = |name: String| ObjectMeta {
            name: Some(name),
            namespace: Some(ns.clone()),
            labels: Some(self.router_labels()),
            owner_references: Some(vec![owner.clone()]),
            ..Default::default()
        };
        let router = self.router_name();
        let stuntman = self.stuntman_name();
        // The original pods, on their own target ports.
        let targets = inbound::target_ports(self.svc);
        let stunt = Service {
            metadata: meta(stuntman.clone()),
            spec: Some(ServiceSpec {
                selector: Some(self.original.clone()),
                ports: Some(targets.iter().map(|p| port(*p, *p)).collect()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let stunt = ensure(
            &Api::<Service>::namespaced(client.clone(), ns),
            &stunt,
            &owner,
        )
        .await?;
        let default_ip = stunt
            .spec
            .and_then(|s| s.cluster_ip)
            .ok_or_else(|| Error::Runtime(format!("service {stuntman} got no ClusterIP")))?;
        let rules = vec![
            PolicyRule {
                api_groups: Some(vec!["".into()]),
                resources: Some(vec!["configmaps".into()]),
                verbs: vec!["list".into(), "watch".into()],
                ..Default::default()
            },
            PolicyRule {
                api_groups: Some(vec!["".into()]),
                resources: Some(vec!["services".into()]),
                resource_names: Some(vec![self.name.to_string()]),
                verbs: vec!["get".into(), "update".into()],
                ..Default::default()
            },
        ];
        let (account, role, binding) = shadow::identity(meta(router.clone()), rules);
        ensure(
            &Api::<ServiceAccount>::namespaced(client.clone(), ns),
            &account,
            &owner,
        )
        .await?;
        ensure(&Api::<Role>::namespaced(client.clone(), ns), &role, &owner).await?;
        ensure(
            &Api::<RoleBinding>::namespaced(client.clone(), ns),
            &binding,
            &owner,
        )
        .await?;
        let ports_arg: Vec<String> = targets.iter().map(u16::to_string).collect();
        let mut pod_meta = meta(router.clone());
        let mut labels = self.opts.user_labels.clone();
        labels.extend(pod_meta.labels.take().unwrap_or_default());
        pod_meta.labels = Some(labels);
        if !self.opts.user_annotations.is_empty() {
            pod_meta.annotations = Some(self.opts.user_annotations.clone());
        }
        let pod = Pod {
            metadata: pod_meta,
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "router".into(),
                    image: Some(self.image.to_string()),
                    image_pull_policy: self.opts.pull_always.then(|| "Always".to_string()),
                    args: Some(vec![
                        "mesh".into(),
                        format!("--ports={}", ports_arg.join(",")),
                        format!("--default={default_ip}"),
                        format!("--service={}", self.name),
                        format!("--health-port={HEALTH_PORT}"),
                    ]),
                    env: Some(vec![
                        EnvVar {
                            name: "POD_NAMESPACE".into(),
                            value_from: Some(EnvVarSource {
                                field_ref: Some(ObjectFieldSelector {
                                    field_path: "metadata.namespace".into(),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            }),
                            ..Default::default()
                        },
                        EnvVar {
                            name: "KT_LOG".into(),
                            value: Some(
                                std::env::var("KT_SHADOW_LOG").unwrap_or_else(|_| "info".into()),
                            ),
                            ..Default::default()
                        },
                    ]),
                    ports: Some(
                        targets
                            .iter()
                            .map(|p| k8s_openapi::api::core::v1::ContainerPort {
                                container_port: i32::from(*p),
                                protocol: Some("TCP".into()),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                    readiness_probe: Some(Probe {
                        tcp_socket: Some(TCPSocketAction {
                            port: IntOrString::Int(i32::from(HEALTH_PORT)),
                            ..Default::default()
                        }),
                        period_seconds: Some(1),
                        ..Default::default()
                    }),
                    security_context: Some(shadow::restricted_container()),
                    resources: shadow::resources(&self.opts.quota),
                    ..Default::default()
                }],
                service_account_name: Some(router.clone()),
                node_selector: (!self.opts.node_selector.is_empty())
                    .then(|| self.opts.node_selector.clone()),
                image_pull_secrets: self.opts.image_pull_secret.as_ref().map(|s| {
                    vec![k8s_openapi::api::core::v1::LocalObjectReference { name: s.clone() }]
                }),
                affinity: Some(near(self.original)),
                restart_policy: Some("Never".into()),
                termination_grace_period_seconds: Some(10),
                security_context: Some(shadow::restricted_pod(&targets)),
                ..Default::default()
            }),
            ..Default::default()
        };
        ensure(&Api::<Pod>::namespaced(client.clone(), ns), &pod, &owner).await?;
        shadow::wait_ready(self.kube, &router, self.opts.creation_timeout).await?;
        Ok(())
    }

    /// Points the Service at the router (once; later developers find it done).
    async fn take_service(&self) -> Result<()> {
        let api = Api::<Service>::namespaced(self.kube.client.clone(), &self.kube.namespace);
        let by = Holder {
            session: changes::BY_MESH_ROUTER.into(),
            ..self.session.holder()
        };
        let router_selector = BTreeMap::from([
            (ROLE_LABEL.to_string(), ROUTER_ROLE.to_string()),
            (MESH_OF.to_string(), self.name.to_string()),
        ]);
        let router = self.router_name();
        let mut took = false;
        let r = changes::modify(&api, self.name, |s: &mut Service| {
            let current = s.spec.as_ref().and_then(|s| s.selector.as_ref());
            took = current != Some(&router_selector);
            if !took {
                return Ok::<_, Holder>(false);
            }
            changes::take_selector(s, &by, router_selector.clone())?;
            s.metadata
                .annotations
                .get_or_insert_with(BTreeMap::new)
                .insert(changes::MESH_ROUTER.into(), router.clone());
            Ok(true)
        })
        .await;
        match r {
            Ok(Some(_)) if took => {
                tracing::info!(
                    "Service '{}' goes through the mesh router {router}",
                    self.name
                );
                crate::pidfile::update(|r| {
                    r.changed
                        .push(format!("selector of service/{} (mesh router)", self.name))
                });
                Ok(())
            }
            Ok(Some(_)) => {
                tracing::info!(
                    "Service '{}' already goes through the mesh router {router}",
                    self.name
                );
                Ok(())
            }
            Ok(None) => Err(EnvError::new(format!("service '{}' was deleted", self.name)).into()),
            Err(changes::ModifyError::Refused(h)) => Err(Error::Runtime(format!(
                "service '{}' is already taken by {h}",
                self.name
            ))),
            Err(changes::ModifyError::Api(e)) => {
                Err(ClusterError::api(format!("updating service {}", self.name), e).into())
            }
        }
    }

    /// Removes this developer's route; the last developer puts the original selector back.
    async fn leave(&self) {
        let ns = &self.kube.namespace;
        let cms = Api::<ConfigMap>::namespaced(self.kube.client.clone(), ns);
        let name = route_name(self.name, self.mark);
        let _ = cms.delete(&name, &Default::default()).await;
        let others = cms
            .list(&ListParams::default().labels(&format!("{MESH_OF}={}", self.name)))
            .await
            .map(|l| {
                l.items
                    .iter()
                    .filter(|c| c.metadata.deletion_timestamp.is_none())
                    .count()
            });
        match others {
            Ok(0) => {
                let api = Api::<Service>::namespaced(self.kube.client.clone(), ns);
                let undo = changes::modify(&api, self.name, |s: &mut Service| {
                    changes::undo_selector(s, Some(changes::BY_MESH_ROUTER))
                })
                .await;
                match undo {
                    Ok(_) => tracing::info!(
                        "Restored the selector of service '{}' (no developer meshes it any more)",
                        self.name
                    ),
                    Err(e) => tracing::error!(
                        "cannot restore the selector of service '{}': {e}; the mesh router restores it once it has no route",
                        self.name
                    ),
                }
            }
            Ok(n) => tracing::info!(
                "{n} other developer(s) still mesh service '{}'; the router stays",
                self.name
            ),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the mesh routes; the router restores the Service once it has no route")
            }
        }
    }
}

/// Prefer a node where the original pods run: a request that stays in the cluster then takes
/// no extra hop between nodes on its way through the router.
fn near(original: &BTreeMap<String, String>) -> Affinity {
    Affinity {
        pod_affinity: Some(PodAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        label_selector: Some(LabelSelector {
                            match_labels: Some(original.clone()),
                            ..Default::default()
                        }),
                        topology_key: "kubernetes.io/hostname".into(),
                        ..Default::default()
                    },
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn port(port: u16, target: u16) -> ServicePort {
    ServicePort {
        name: Some(format!("port-{port}")),
        port: i32::from(port),
        target_port: Some(IntOrString::Int(i32::from(target))),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

/// Creates a shared object, or adds `owner` to the existing one's owners; the object.
async fn ensure<K>(api: &Api<K>, obj: &K, owner: &OwnerReference) -> Result<K>
where
    K: kube::Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    match api.create(&PostParams::default(), obj).await {
        Ok(o) => return Ok(o),
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(ClusterError::api(format!("creating {name}"), e).into()),
    }
    let joined = changes::modify(api, &name, |o: &mut K| {
        let refs = o.meta_mut().owner_references.get_or_insert_with(Vec::new);
        if refs.iter().any(|r| r.uid == owner.uid) {
            return Ok::<_, std::convert::Infallible>(false);
        }
        refs.push(owner.clone());
        Ok(true)
    })
    .await
    .map_err(|e| Error::Runtime(format!("joining {name}: {e}")))?;
    joined.ok_or_else(|| Error::Runtime(format!("{name} vanished while joining it")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_marks_parse_in_kt_connects_forms() {
        assert_eq!(
            parse_mark(Some("VERSION:v2"), false),
            Ok(Mark {
                key: "VERSION".into(),
                value: "v2".into()
            })
        );
        assert_eq!(
            parse_mark(Some("abc"), false),
            Ok(Mark {
                key: "version".into(),
                value: "abc".into()
            })
        );
        let random = parse_mark(Some("x-dev:"), false).expect("random");
        assert_eq!(random.key, "x-dev");
        assert_eq!(random.value.len(), 5);
        assert!(random.value.bytes().all(|b| b.is_ascii_lowercase()));
        let default = parse_mark(None, false).expect("default");
        assert_eq!(default.key, "version");
        for bad in [
            "bad header:v",
            "x:two words",
            "x:é",
            ":v",
            "x:-v",
            "x:a_b",
            "x:a.b",
        ] {
            assert!(parse_mark(Some(bad), false).is_err(), "{bad:?} accepted");
        }
        assert!(
            parse_mark(Some("VERSION:v"), true).is_err(),
            "labels are lowercase"
        );
    }
}
