//! The shadow: a pod running `kt-router shadow`, the in-cluster end of the tunnel, and the
//! ServiceAccount that lets it end its own session.
//!
//! No Secret: the shadow makes its TLS key in its own memory and ktctl pins its certificate
//! on the first connection (see `kt_common::tunnel::ServerPin`); all the pod gets is the
//! session CA's certificate (public), to check ktctl's client certificate. The pod is
//! admitted by the `restricted` Pod Security Standard: non-root, no privilege escalation, no
//! capabilities, RuntimeDefault seccomp, a read-only root filesystem. It never restarts in
//! place (`restartPolicy: Never`), since a restarted shadow would have a new key: a shadow
//! that dies is replaced by a new pod, which ktctl pins afresh.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, Event, LocalObjectReference,
    ObjectFieldSelector, Pod, PodSecurityContext, PodSpec, Probe, ResourceRequirements,
    SeccompProfile, SecurityContext, ServiceAccount, Sysctl, TCPSocketAction,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Api;
use kube::api::ListParams;

use super::ClusterError;
use super::session::{Kind, Session};
use crate::progress::Progress;

/// Port of the tunnel in the shadow pod.
pub const TUNNEL_PORT: u16 = 7443;
/// Port of the shadow's readiness listener (kt-router's `--health-port`).
pub const HEALTH_PORT: u16 = 7444;
/// The user the shadow runs as (nonroot in distroless images).
pub const SHADOW_UID: i64 = 65532;

/// How to run the shadow (kt-connect's flags).
#[derive(Clone, Debug, Default)]
pub struct ShadowOptions {
    /// The shadow pod's name, as kt-connect names it for the command (`<svc>-kt-exchange-{id}`,
    /// `<svc>-kt-mesh-<mark>`, `<name>-kt-{id}`; `{id}` is the session's id);
    /// `kt-connect-shadow-{id}` when unset.
    pub name: Option<String>,
    pub image: String,
    pub image_pull_secret: Option<String>,
    /// imagePullPolicy Always (`--forceUpdate`).
    pub pull_always: bool,
    /// The user's extra pod labels and annotations (`--withLabel`, `--withAnnotation`).
    pub user_labels: BTreeMap<String, String>,
    pub user_annotations: BTreeMap<String, String>,
    pub node_selector: BTreeMap<String, String>,
    /// Requests and limits (`--podQuota`).
    pub quota: Quota,
    pub creation_timeout: Duration,
    /// The CIDRs the session routes and those cut out of them: the only destinations the
    /// shadow dials (`--routes`, `--except`).
    pub routes: Vec<String>,
    pub except: Vec<String>,
    /// Ports the shadow listens on for the whole session (exchange, mesh, preview); each
    /// becomes a container port, so Services and routers can target it.
    pub ports: Vec<u16>,
    /// Extra pod labels (scale mode: the workload's; manual mesh: plus `version`). The
    /// session's own labels always win.
    pub labels: BTreeMap<String, String>,
    /// What the session changes in users' objects (`service/<name>`, `deployment/<name>`):
    /// the shadow may read and update exactly these, to restore them when ktctl is gone.
    pub restore: Vec<String>,
}

/// Parses `key=value,key2=value2` (`--nodeSelector`, `--withLabel`, `--withAnnotation`).
pub fn parse_pairs(flag: &str, s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("{flag}: {part:?} is not key=value"))?;
        if k.is_empty() {
            return Err(format!("{flag}: {part:?} has an empty key"));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// Parses `--nodeSelector key=value,key2=value2`.
pub fn parse_node_selector(s: &str) -> Result<BTreeMap<String, String>, String> {
    parse_pairs("--nodeSelector", s)
}

/// The shadow's CPU and memory (`--podQuota`), as Kubernetes quantities; requests = limits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Quota {
    pub cpu: Option<String>,
    pub memory: Option<String>,
}

/// Parses `--podQuota` in kt-connect's syntax, `0.5c,512m`: a part ending in `c` is CPU, one
/// ending in `k`, `m` or `g` is memory in KiB, MiB or GiB; either may be left out, in any
/// order. Kubernetes quantities work too: `0.5,256Mi` (CPU first when the part does not say),
/// `256Mi`, `1Gi`. Note that `512m` is kt-connect's 512 MiB, not 0.512 CPU: write `0.5c`.
pub fn parse_quota(s: &str) -> Result<Quota, String> {
    let bad = |why: &str| {
        format!(
            "--podQuota: {s:?} {why}; give e.g. 0.5c,512m (CPU with c, memory with k/m/g) or 0.5,256Mi"
        )
    };
    let number =
        |n: &str| !n.is_empty() && n.parse::<f64>().is_ok_and(|v| v.is_finite() && v > 0.0);
    let mut q = Quota::default();
    for part in s.split(',').map(str::trim) {
        let (slot, value) = if let Some(n) = part.strip_suffix(['c', 'C']) {
            (&mut q.cpu, n.to_string())
        } else if let Some(n) = part.strip_suffix(['k', 'K']) {
            (&mut q.memory, format!("{n}Ki"))
        } else if let Some(n) = part.strip_suffix(['m', 'M']) {
            (&mut q.memory, format!("{n}Mi"))
        } else if let Some(n) = part.strip_suffix(['g', 'G']) {
            (&mut q.memory, format!("{n}Gi"))
        } else if let Some(n) = ["Ki", "Mi", "Gi", "Ti"]
            .iter()
            .find_map(|u| part.strip_suffix(u).map(|n| (n, *u)))
        {
            (&mut q.memory, format!("{}{}", n.0, n.1))
        } else if number(part) {
            // A bare number: CPU if not given yet, else memory in bytes.
            if q.cpu.is_none() {
                (&mut q.cpu, part.to_string())
            } else {
                (&mut q.memory, part.to_string())
            }
        } else {
            return Err(bad(&format!(
                "has {part:?}, which is neither CPU nor memory"
            )));
        };
        let n = value.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        if !number(n) {
            return Err(bad(&format!(
                "has {part:?}, whose amount is not a positive number"
            )));
        }
        if slot.replace(value).is_some() {
            return Err(bad("gives the same resource twice"));
        }
    }
    Ok(q)
}

/// Requests and limits (equal) of a pod of ktctl's, from `--podQuota`; none when not given.
pub fn resources(quota: &Quota) -> Option<ResourceRequirements> {
    let amounts: BTreeMap<String, Quantity> = [("cpu", &quota.cpu), ("memory", &quota.memory)]
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_string(), Quantity(v.clone()?))))
        .collect();
    (!amounts.is_empty()).then(|| ResourceRequirements {
        limits: Some(amounts.clone()),
        requests: Some(amounts),
        ..Default::default()
    })
}

/// The shadow's pod name for the session's `n`th shadow (0: the first; a replacement gets a
/// new name, so that nothing can mistake it for the pod it replaces). kt-connect's names:
/// `kt-connect-shadow-<id>` unless the command names it ([`ShadowOptions::name`]).
pub fn pod_name(session: &Session, opts: &ShadowOptions, n: u32) -> String {
    let base = opts
        .name
        .as_deref()
        .unwrap_or("kt-connect-shadow-{id}")
        .replace("{id}", &session.id);
    match n {
        0 => base,
        n => format!("{base}-{n}"),
    }
}

/// Creates the shadow's ServiceAccount, Role and RoleBinding (once per session: they let the
/// shadow read and delete the session's Lease).
pub async fn deploy_identity(
    session: &Session,
    role: &str,
    restore: &[String],
) -> Result<(), ClusterError> {
    let base = format!("kt-connect-shadow-{}", session.id);
    let mut rules = vec![PolicyRule {
        api_groups: Some(vec!["coordination.k8s.io".into()]),
        resources: Some(vec!["leases".into()]),
        resource_names: Some(vec![session.lease.clone()]),
        verbs: vec!["get".into(), "delete".into()],
        ..Default::default()
    }];
    rules.extend(restore_rules(restore));
    let (account, role, binding) = identity(session.meta(&base, role), rules);
    session.create(Kind::ServiceAccount, &account).await?;
    session.create(Kind::Role, &role).await?;
    session.create(Kind::RoleBinding, &binding).await?;
    Ok(())
}

/// A pod's identity: a ServiceAccount, a Role granting `rules` and the binding between them,
/// all three with `meta` (whose name and namespace they share).
pub fn identity(meta: ObjectMeta, rules: Vec<PolicyRule>) -> (ServiceAccount, Role, RoleBinding) {
    let name = meta.name.clone().unwrap_or_default();
    let binding = RoleBinding {
        metadata: meta.clone(),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            namespace: meta.namespace.clone(),
            name,
            ..Default::default()
        }]),
    };
    let role = Role {
        metadata: meta.clone(),
        rules: Some(rules),
    };
    let account = ServiceAccount {
        metadata: meta,
        ..Default::default()
    };
    (account, role, binding)
}

/// Rules to read and update exactly the objects in `restore` (`service/x`, `deployment/y`).
fn restore_rules(restore: &[String]) -> Vec<PolicyRule> {
    let names = |kind: &str| -> Vec<String> {
        restore
            .iter()
            .filter_map(|r| r.strip_prefix(kind)?.strip_prefix('/').map(str::to_string))
            .collect()
    };
    let mut rules = vec![];
    if !names("mesh").is_empty() {
        // Whether other sessions still mesh the Service: their routes.
        rules.push(PolicyRule {
            api_groups: Some(vec!["".into()]),
            resources: Some(vec!["configmaps".into()]),
            verbs: vec!["list".into()],
            ..Default::default()
        });
    }
    let mut services = names("service");
    services.extend(names("mesh"));
    for (group, resource, n) in [
        ("", "services", services),
        ("apps", "deployments", names("deployment")),
    ] {
        if !n.is_empty() {
            rules.push(PolicyRule {
                api_groups: Some(vec![group.into()]),
                resources: Some(vec![resource.into()]),
                resource_names: Some(n),
                verbs: vec!["get".into(), "update".into()],
                ..Default::default()
            });
        }
    }
    rules
}

/// Creates the session's `n`th shadow pod and waits until it is ready, showing progress; on
/// failure shows the pod's conditions and events.
pub async fn deploy_pod(
    session: &Session,
    kube: &super::Kube,
    role: &str,
    opts: &ShadowOptions,
    client_ca_pem: &str,
    n: u32,
) -> Result<Pod, ClusterError> {
    let name = pod_name(session, opts, n);
    let pod = pod_spec(session, role, &name, opts, client_ca_pem);
    session.create(Kind::Pod, &pod).await?;
    wait_ready(kube, &name, opts.creation_timeout).await
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn pod_spec(
    session: &Session,
    role: &str,
    name: &str,
    opts: &ShadowOptions,
    client_ca_pem: &str,
) -> Pod {
    let args = vec![
        "shadow".to_string(),
        format!("--listen=0.0.0.0:{TUNNEL_PORT}"),
        format!("--health-port={HEALTH_PORT}"),
        format!("--session={}", session.id),
        format!("--lease={}", session.lease),
        format!("--grace={}", session.grace.as_secs()),
        format!("--routes={}", opts.routes.join(",")),
        format!("--except={}", opts.except.join(",")),
    ];
    let mut args = args;
    if !opts.ports.is_empty() {
        let ports: Vec<String> = opts.ports.iter().map(u16::to_string).collect();
        args.push(format!("--expose={}", ports.join(",")));
    }
    if !opts.restore.is_empty() {
        args.push(format!("--restore={}", opts.restore.join(",")));
    }
    let mut ports = vec![ContainerPort {
        container_port: i32::from(TUNNEL_PORT),
        name: Some("tunnel".into()),
        protocol: Some("TCP".into()),
        ..Default::default()
    }];
    ports.extend(opts.ports.iter().map(|p| ContainerPort {
        container_port: i32::from(*p),
        protocol: Some("TCP".into()),
        ..Default::default()
    }));
    let resources = resources(&opts.quota);
    let container = Container {
        name: "shadow".into(),
        image: Some(opts.image.clone()),
        image_pull_policy: opts.pull_always.then(|| "Always".to_string()),
        args: Some(args),
        env: Some(vec![
            field_env("POD_NAMESPACE", "metadata.namespace"),
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_IP", "status.podIP"),
            EnvVar {
                name: "KT_CLIENT_CA".into(),
                value: Some(client_ca_pem.to_string()),
                ..Default::default()
            },
            EnvVar {
                name: "KT_LOG".into(),
                value: Some(std::env::var("KT_SHADOW_LOG").unwrap_or_else(|_| "info".into())),
                ..Default::default()
            },
        ]),
        ports: Some(ports),
        readiness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(i32::from(HEALTH_PORT)),
                ..Default::default()
            }),
            period_seconds: Some(1),
            ..Default::default()
        }),
        security_context: Some(restricted_container()),
        resources,
        ..Default::default()
    };
    let mut metadata = session.meta(name, role);
    // The user's labels, then the command's, then the session's: the later win.
    let mut labels = opts.user_labels.clone();
    labels.extend(opts.labels.clone());
    labels.extend(metadata.labels.take().unwrap_or_default());
    metadata.labels = Some(labels);
    if !opts.user_annotations.is_empty() {
        metadata.annotations = Some(opts.user_annotations.clone());
    }
    Pod {
        metadata,
        spec: Some(PodSpec {
            containers: vec![container],
            service_account_name: Some(format!("kt-connect-shadow-{}", session.id)),
            automount_service_account_token: Some(true),
            termination_grace_period_seconds: Some(5),
            restart_policy: Some("Never".into()),
            security_context: Some(restricted_pod(&opts.ports)),
            node_selector: (!opts.node_selector.is_empty()).then(|| opts.node_selector.clone()),
            image_pull_secrets: opts
                .image_pull_secret
                .as_ref()
                .map(|s| vec![LocalObjectReference { name: s.clone() }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A container as the `restricted` Pod Security Standard wants it: non-root, no privilege
/// escalation, no capabilities, a read-only root filesystem.
pub fn restricted_container() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        run_as_user: Some(SHADOW_UID),
        run_as_group: Some(SHADOW_UID),
        ..Default::default()
    }
}

/// The pod side of [`restricted_container`], for a pod that listens on `ports`.
pub fn restricted_pod(ports: &[u16]) -> PodSecurityContext {
    // A port below 1024 needs no capability: the pod's own network namespace lets every
    // user bind it (a "safe" sysctl, allowed by the restricted Pod Security Standard).
    let sysctls = ports.iter().any(|p| *p < 1024).then(|| {
        vec![Sysctl {
            name: "net.ipv4.ip_unprivileged_port_start".into(),
            value: "0".into(),
        }]
    });
    PodSecurityContext {
        run_as_non_root: Some(true),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        sysctls,
        ..Default::default()
    }
}

/// Container states that will not get better by waiting.
const HOPELESS: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
    "CrashLoopBackOff",
];

/// What a pod is doing, in a few words (for progress and errors).
pub fn describe_state(pod: &Pod) -> (String, Option<String>) {
    let st = pod.status.clone().unwrap_or_default();
    let phase = st.phase.unwrap_or_else(|| "Pending".into());
    for cs in st.container_statuses.unwrap_or_default() {
        if let Some(w) = cs.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            let reason = w.reason.clone().unwrap_or_default();
            let msg = w.message.clone().unwrap_or_default();
            let hopeless = HOPELESS
                .contains(&reason.as_str())
                .then(|| format!("{reason}: {msg}"));
            return (format!("{phase}, {reason}"), hopeless);
        }
        if let Some(t) = cs.state.as_ref().and_then(|s| s.terminated.as_ref()) {
            let what = format!(
                "container exited with code {} ({})",
                t.exit_code,
                t.reason.clone().unwrap_or_default()
            );
            return (
                format!("{phase}, {what}"),
                Some(format!("{what}: {}", t.message.clone().unwrap_or_default())),
            );
        }
    }
    if let Some(c) = st
        .conditions
        .unwrap_or_default()
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
    {
        return (
            format!(
                "{phase}, not scheduled: {}",
                c.message.clone().unwrap_or_default()
            ),
            None,
        );
    }
    if phase == "Failed" || phase == "Succeeded" {
        return (phase.clone(), Some(format!("pod {}", phase.to_lowercase())));
    }
    (phase, None)
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits until the pod is Ready; fails early on a hopeless state, with conditions and events.
pub async fn wait_ready(
    kube: &super::Kube,
    name: &str,
    timeout: Duration,
) -> Result<Pod, ClusterError> {
    let api: Api<Pod> = Api::namespaced(kube.client.clone(), &kube.namespace);
    let started = Instant::now();
    let mut progress = Progress::new(format!("Waiting for pod {name}"));
    loop {
        let pod = api
            .get(name)
            .await
            .map_err(|e| ClusterError::api(format!("reading pod {name}"), e))?;
        if is_ready(&pod) {
            progress.finish();
            return Ok(pod);
        }
        let (state, hopeless) = describe_state(&pod);
        progress.set(format!("Waiting for pod {name}: {state}"));
        let failure = match hopeless {
            Some(why) => Some(why),
            None if started.elapsed() > timeout => Some(format!(
                "not ready after {timeout:?} (--podCreationTimeout); state: {state}"
            )),
            None => None,
        };
        if let Some(why) = failure {
            progress.finish();
            let details = pod_report(kube, &pod).await;
            return Err(ClusterError::Shadow(format!(
                "shadow pod {name} did not start: {why}\n{details}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The pod's conditions and recent events, as `kubectl describe` shows them.
pub async fn pod_report(kube: &super::Kube, pod: &Pod) -> String {
    let mut out = String::from("Conditions:\n");
    for c in pod
        .status
        .clone()
        .unwrap_or_default()
        .conditions
        .unwrap_or_default()
    {
        out += &format!(
            "  {:<26} {:<6} {}\n",
            c.type_,
            c.status,
            c.message.unwrap_or_default()
        );
    }
    out += "Events:\n";
    let name = pod.metadata.name.clone().unwrap_or_default();
    let events: Api<Event> = Api::namespaced(kube.client.clone(), &kube.namespace);
    match events
        .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await
    {
        Ok(list) => {
            let mut items = list.items;
            items.sort_by_key(|e| e.last_timestamp.clone().map(|t| t.0));
            for e in items.iter().rev().take(12).rev() {
                out += &format!(
                    "  {:<8} {:<22} {}\n",
                    e.type_.clone().unwrap_or_default(),
                    e.reason.clone().unwrap_or_default(),
                    e.message.clone().unwrap_or_default().trim()
                );
            }
            if items.is_empty() {
                out += "  (none)\n";
            }
        }
        Err(e) => out += &format!("  (cannot list events: {e})\n"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_selectors_parse() {
        assert_eq!(
            parse_node_selector("a=b, c=d").unwrap(),
            BTreeMap::from([("a".into(), "b".into()), ("c".into(), "d".into())])
        );
        assert_eq!(parse_node_selector("").unwrap(), BTreeMap::new());
        assert!(parse_node_selector("nokey").is_err());
        assert!(parse_node_selector("=v").is_err());
    }

    #[test]
    fn quotas_parse_in_kt_connects_syntax_and_as_kubernetes_quantities() {
        let q = |cpu: Option<&str>, memory: Option<&str>| Quota {
            cpu: cpu.map(str::to_string),
            memory: memory.map(str::to_string),
        };
        assert_eq!(parse_quota("0.5c,512m"), Ok(q(Some("0.5"), Some("512Mi"))));
        assert_eq!(
            parse_quota("512m,0.5c"),
            Ok(q(Some("0.5"), Some("512Mi"))),
            "any order"
        );
        assert_eq!(parse_quota("1g"), Ok(q(None, Some("1Gi"))));
        assert_eq!(parse_quota("2c"), Ok(q(Some("2"), None)));
        assert_eq!(parse_quota("100k"), Ok(q(None, Some("100Ki"))));
        assert_eq!(parse_quota("0.5,256Mi"), Ok(q(Some("0.5"), Some("256Mi"))));
        assert_eq!(parse_quota("0.5"), Ok(q(Some("0.5"), None)));
        for bad in ["lots,256Mi", "1c,2c", "512m,1g", "", "c", "-1c", "0.5x"] {
            assert!(parse_quota(bad).is_err(), "{bad:?}");
        }
    }
}
