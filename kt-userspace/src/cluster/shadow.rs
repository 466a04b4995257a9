//! The shadow: a pod running `kt-router shadow`, the in-cluster end of the tunnel, with the
//! Secret holding its TLS credentials and the ServiceAccount that lets it end its own session.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, Event, LocalObjectReference,
    ObjectFieldSelector, Pod, PodSpec, Probe, ResourceRequirements, Secret, SecretVolumeSource,
    ServiceAccount, TCPSocketAction, Volume, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kt_common::tunnel::Identity;
use kube::Api;
use kube::api::ListParams;

use super::ClusterError;
use super::session::{Kind, Session};
use crate::progress::Progress;

/// Port of the tunnel in the shadow pod.
pub const TUNNEL_PORT: u16 = 7443;
/// Where the Secret is mounted in the pod.
const TLS_DIR: &str = "/etc/kt/tls";

/// How to run the shadow (kt-connect's flags).
#[derive(Clone, Debug, Default)]
pub struct ShadowOptions {
    pub image: String,
    pub image_pull_secret: Option<String>,
    pub node_selector: BTreeMap<String, String>,
    /// Limits, as `--podQuota cpu,memory` (e.g. `0.5,256Mi`).
    pub quota: Option<(String, String)>,
    pub creation_timeout: Duration,
}

/// Parses `--nodeSelector key=value,key2=value2`.
pub fn parse_node_selector(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("--nodeSelector: {part:?} is not key=value"))?;
        if k.is_empty() {
            return Err(format!("--nodeSelector: {part:?} has an empty key"));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// Parses `--podQuota cpu,memory`.
pub fn parse_quota(s: &str) -> Result<(String, String), String> {
    let (cpu, mem) = s
        .split_once(',')
        .ok_or_else(|| format!("--podQuota: {s:?} is not cpu,memory (e.g. 0.5,256Mi)"))?;
    let ok = |q: &str| {
        !q.is_empty()
            && q.chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit() || c == '.')
    };
    if !ok(cpu) || !ok(mem) {
        return Err(format!(
            "--podQuota: {s:?} is not cpu,memory (e.g. 0.5,256Mi)"
        ));
    }
    Ok((cpu.to_string(), mem.to_string()))
}

/// Creates the shadow's Secret, ServiceAccount, Role, RoleBinding and Pod; waits until it is
/// ready, showing progress; on failure shows the pod's conditions and events.
pub async fn deploy(
    session: &Session,
    kube: &super::Kube,
    role: &str,
    opts: &ShadowOptions,
    server: &Identity,
) -> Result<Pod, ClusterError> {
    let base = format!("kt-connect-shadow-{}", session.id);
    let secret = Secret {
        metadata: session.meta(&format!("{base}-tls"), role),
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            (
                "tls.crt".to_string(),
                ByteString(server.cert_pem.clone().into_bytes()),
            ),
            (
                "tls.key".to_string(),
                ByteString(server.key_pem.clone().into_bytes()),
            ),
            (
                "ca.crt".to_string(),
                ByteString(server.ca_pem.clone().into_bytes()),
            ),
        ])),
        ..Default::default()
    };
    session.create(Kind::Secret, &secret).await?;
    session
        .create(
            Kind::ServiceAccount,
            &ServiceAccount {
                metadata: session.meta(&base, role),
                ..Default::default()
            },
        )
        .await?;
    let rule = PolicyRule {
        api_groups: Some(vec!["coordination.k8s.io".into()]),
        resources: Some(vec!["leases".into()]),
        resource_names: Some(vec![session.lease.clone()]),
        verbs: vec!["get".into(), "delete".into()],
        ..Default::default()
    };
    session
        .create(
            Kind::Role,
            &Role {
                metadata: session.meta(&base, role),
                rules: Some(vec![rule]),
            },
        )
        .await?;
    let binding = RoleBinding {
        metadata: session.meta(&base, role),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: base.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: base.clone(),
            namespace: Some(session.namespace.clone()),
            ..Default::default()
        }]),
    };
    session.create(Kind::RoleBinding, &binding).await?;
    let pod = pod_spec(session, role, &base, opts);
    session.create(Kind::Pod, &pod).await?;
    wait_ready(kube, &base, opts.creation_timeout).await
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

fn pod_spec(session: &Session, role: &str, name: &str, opts: &ShadowOptions) -> Pod {
    let args = vec![
        "shadow".to_string(),
        format!("--listen=0.0.0.0:{TUNNEL_PORT}"),
        format!("--tls-dir={TLS_DIR}"),
        format!("--session={}", session.id),
        format!("--lease={}", session.lease),
        format!("--grace={}", session.grace.as_secs()),
    ];
    let resources = opts.quota.as_ref().map(|(cpu, mem)| ResourceRequirements {
        limits: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity(cpu.clone())),
            ("memory".to_string(), Quantity(mem.clone())),
        ])),
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity(cpu.clone())),
            ("memory".to_string(), Quantity(mem.clone())),
        ])),
        ..Default::default()
    });
    let container = Container {
        name: "shadow".into(),
        image: Some(opts.image.clone()),
        args: Some(args),
        env: Some(vec![
            field_env("POD_NAMESPACE", "metadata.namespace"),
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_IP", "status.podIP"),
            EnvVar {
                name: "KT_LOG".into(),
                value: Some(std::env::var("KT_SHADOW_LOG").unwrap_or_else(|_| "info".into())),
                ..Default::default()
            },
        ]),
        ports: Some(vec![ContainerPort {
            container_port: i32::from(TUNNEL_PORT),
            name: Some("tunnel".into()),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        readiness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(i32::from(TUNNEL_PORT)),
                ..Default::default()
            }),
            period_seconds: Some(1),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: "tls".into(),
            mount_path: TLS_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        }]),
        resources,
        ..Default::default()
    };
    Pod {
        metadata: session.meta(name, role),
        spec: Some(PodSpec {
            containers: vec![container],
            service_account_name: Some(name.to_string()),
            automount_service_account_token: Some(true),
            termination_grace_period_seconds: Some(5),
            node_selector: (!opts.node_selector.is_empty()).then(|| opts.node_selector.clone()),
            image_pull_secrets: opts
                .image_pull_secret
                .as_ref()
                .map(|s| vec![LocalObjectReference { name: s.clone() }]),
            volumes: Some(vec![Volume {
                name: "tls".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(format!("{name}-tls")),
                    default_mode: Some(0o400),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
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
    fn quotas_parse() {
        assert_eq!(
            parse_quota("0.5,256Mi").unwrap(),
            ("0.5".into(), "256Mi".into())
        );
        assert!(parse_quota("0.5").is_err());
        assert!(parse_quota("lots,256Mi").is_err());
    }
}
