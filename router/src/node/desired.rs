//! What a node steers, computed from Kubernetes alone: the ready shadow pods labelled
//! [`STEER_LABEL`]`=<service>`, their Service and its EndpointSlices. Every node steers the
//! same set (a caller can sit on any node).
//!
//! For each Service port whose target port the shadow serves (one of its container ports):
//! the ClusterIP and port, and every endpoint address of the Service (the original pods) on
//! that target port, go to the shadow's IP on the target port. A shadow steers only its own
//! namespace's Service; two shadows claiming the same address: the older pod wins.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kt_common::changes::STEER_LABEL;

use crate::steer::Proto;

/// Where a steered address goes, and why (for the logs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Steer {
    pub to: SocketAddrV4,
    /// `<namespace>/<service>`.
    pub service: String,
    /// `<namespace>/<shadow pod>`.
    pub shadow: String,
}

/// Steered `address:port`s and protocol -> where they go.
pub type Desired = BTreeMap<(SocketAddrV4, Proto), Steer>;

/// A shadow that asks for steering and is ready to take it.
struct Shadow<'a> {
    namespace: &'a str,
    name: &'a str,
    service: &'a str,
    ip: Ipv4Addr,
    serves: BTreeSet<(u16, Proto)>,
}

/// A port name, where none and empty are the same (a Service's only port has no name; its
/// EndpointSlice port has "").
fn same_name(a: &Option<String>, b: &Option<String>) -> bool {
    a.as_deref().unwrap_or("") == b.as_deref().unwrap_or("")
}

fn proto(p: Option<&str>) -> Option<Proto> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Proto::Tcp),
        "UDP" => Some(Proto::Udp),
        _ => None,
    }
}

fn shadow(pod: &Pod) -> Option<Shadow<'_>> {
    let meta = &pod.metadata;
    if meta.deletion_timestamp.is_some() {
        return None;
    }
    let service = meta.labels.as_ref()?.get(STEER_LABEL)?;
    let status = pod.status.as_ref()?;
    let ready = status.phase.as_deref() == Some("Running")
        && status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
    if !ready {
        return None;
    }
    let ip = status.pod_ip.as_deref()?.parse().ok()?;
    let serves = pod
        .spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            Some((
                u16::try_from(p.container_port).ok()?,
                proto(p.protocol.as_deref())?,
            ))
        })
        .collect();
    Some(Shadow {
        namespace: meta.namespace.as_deref()?,
        name: meta.name.as_deref()?,
        service,
        ip,
        serves,
    })
}

/// The steering every node applies.
pub fn desired(
    pods: &[Arc<Pod>],
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
) -> Desired {
    // Oldest first, so that the first claim of an address is the one kept.
    let mut pods: Vec<&Pod> = pods.iter().map(|p| p.as_ref()).collect();
    pods.sort_by(|a, b| {
        let key = |p: &Pod| {
            (
                p.metadata.creation_timestamp.clone(),
                p.metadata.name.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
    let shadows: Vec<Shadow> = pods.into_iter().filter_map(shadow).collect();
    // A shadow is never a steered endpoint, not even of another shadow's Service.
    let shadow_ips: BTreeSet<Ipv4Addr> = shadows.iter().map(|s| s.ip).collect();
    let mut out = Desired::new();
    for s in shadows {
        let Some(svc) = services.iter().find(|x| {
            x.metadata.namespace.as_deref() == Some(s.namespace)
                && x.metadata.name.as_deref() == Some(s.service)
        }) else {
            continue;
        };
        let slices: Vec<&EndpointSlice> = slices
            .iter()
            .filter(|e| {
                e.metadata.namespace.as_deref() == Some(s.namespace)
                    && e.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("kubernetes.io/service-name"))
                        .map(String::as_str)
                        == Some(s.service)
            })
            .map(|e| e.as_ref())
            .collect();
        let spec = svc.spec.as_ref();
        let cluster_ip = spec
            .and_then(|x| x.cluster_ip.as_deref())
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok());
        for port in spec.and_then(|x| x.ports.as_ref()).into_iter().flatten() {
            let Some(p) = proto(port.protocol.as_deref()) else {
                continue;
            };
            let Ok(svc_port) = u16::try_from(port.port) else {
                continue;
            };
            let target = match &port.target_port {
                None => Some(svc_port),
                Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
                // A named port: its number as the EndpointSlices give it.
                Some(IntOrString::String(_)) => slices
                    .iter()
                    .flat_map(|e| e.ports.iter().flatten())
                    .find(|ep| {
                        same_name(&ep.name, &port.name) && proto(ep.protocol.as_deref()) == Some(p)
                    })
                    .and_then(|ep| ep.port)
                    .and_then(|n| u16::try_from(n).ok()),
            };
            let Some(target) = target.filter(|t| s.serves.contains(&(*t, p))) else {
                continue;
            };
            let steer = Steer {
                to: SocketAddrV4::new(s.ip, target),
                service: format!("{}/{}", s.namespace, s.service),
                shadow: format!("{}/{}", s.namespace, s.name),
            };
            if let Some(ip) = cluster_ip {
                out.entry((SocketAddrV4::new(ip, svc_port), p))
                    .or_insert_with(|| steer.clone());
            }
            for e in &slices {
                let ports: Vec<u16> = e
                    .ports
                    .iter()
                    .flatten()
                    .filter(|ep| {
                        same_name(&ep.name, &port.name) && proto(ep.protocol.as_deref()) == Some(p)
                    })
                    .filter_map(|ep| ep.port.and_then(|n| u16::try_from(n).ok()))
                    .collect();
                let addrs = e
                    .endpoints
                    .iter()
                    .flatten()
                    .flat_map(|ep| ep.addresses.iter())
                    .filter_map(|a| a.parse::<Ipv4Addr>().ok())
                    .filter(|a| !shadow_ips.contains(a));
                for a in addrs {
                    for &n in &ports {
                        out.entry((SocketAddrV4::new(a, n), p))
                            .or_insert_with(|| steer.clone());
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, ip: &str, ready: bool, created: &str, ports: serde_json::Value) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "team", "creationTimestamp": created,
                             "labels": {STEER_LABEL: "nginx"}},
                "spec": {"containers": [{"name": "shadow", "image": "kt-router", "ports": ports}]},
                "status": {"phase": "Running", "podIP": ip,
                           "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
            }))
            .unwrap(),
        )
    }

    fn service() -> Arc<Service> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": "nginx", "namespace": "team"},
                "spec": {"clusterIP": "10.96.0.10", "ports": [
                    {"name": "http", "port": 80, "targetPort": "web"},
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
                    {"name": "admin", "port": 9000, "targetPort": 9000}
                ]}
            }))
            .unwrap(),
        )
    }

    fn slice() -> Arc<EndpointSlice> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": "nginx-abc", "namespace": "team",
                             "labels": {"kubernetes.io/service-name": "nginx"}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.244.1.5"]}, {"addresses": ["10.244.2.9"]}],
                "ports": [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"},
                          {"name": "admin", "port": 9000}]
            }))
            .unwrap(),
        )
    }

    fn at(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn a_ready_shadow_takes_the_cluster_ip_and_the_pods_on_the_ports_it_serves() {
        let shadow = pod(
            "nginx-kt-exchange-a",
            "10.244.2.7",
            true,
            "2026-12-04T10:00:00Z",
            json!([{"containerPort": 8080}, {"containerPort": 5353, "protocol": "UDP"}]),
        );
        let d = desired(&[shadow], &[service()], &[slice()]);
        let keys: Vec<String> = d.keys().map(|(a, p)| format!("{a}/{p:?}")).collect();
        assert_eq!(
            keys,
            [
                "10.96.0.10:53/Udp",
                "10.96.0.10:80/Tcp",
                "10.244.1.5:5353/Udp",
                "10.244.1.5:8080/Tcp",
                "10.244.2.9:5353/Udp",
                "10.244.2.9:8080/Tcp"
            ],
            "port 9000 is not served by the shadow"
        );
        let to = |a: &str, p: Proto| d.get(&(at(a), p)).map(|x| x.to);
        assert_eq!(to("10.96.0.10:80", Proto::Tcp), Some(at("10.244.2.7:8080")));
        assert_eq!(
            to("10.244.1.5:8080", Proto::Tcp),
            Some(at("10.244.2.7:8080"))
        );
        assert_eq!(to("10.96.0.10:53", Proto::Udp), Some(at("10.244.2.7:5353")));
        let s = &d[&(at("10.96.0.10:80"), Proto::Tcp)];
        assert_eq!(
            (s.service.as_str(), s.shadow.as_str()),
            ("team/nginx", "team/nginx-kt-exchange-a")
        );
    }

    #[test]
    fn nothing_is_steered_for_a_shadow_not_ready_elsewhere_or_without_its_service() {
        let ports = json!([{"containerPort": 8080}]);
        let unready = pod(
            "a",
            "10.244.2.7",
            false,
            "2026-12-04T10:00:00Z",
            ports.clone(),
        );
        assert!(desired(&[unready], &[service()], &[slice()]).is_empty());
        let ready = pod(
            "a",
            "10.244.2.7",
            true,
            "2026-12-04T10:00:00Z",
            ports.clone(),
        );
        assert!(desired(std::slice::from_ref(&ready), &[], &[slice()]).is_empty());
        let mut other_ns = (*ready).clone();
        other_ns.metadata.namespace = Some("elsewhere".into());
        assert!(desired(&[Arc::new(other_ns)], &[service()], &[slice()]).is_empty());
        let mut going = (*ready).clone();
        going.metadata.deletion_timestamp = ready.metadata.creation_timestamp.clone();
        assert!(desired(&[Arc::new(going)], &[service()], &[slice()]).is_empty());
    }

    #[test]
    fn the_older_shadow_keeps_an_address_and_a_shadow_never_steers_itself() {
        let ports = json!([{"containerPort": 8080}]);
        let newer = pod(
            "b-newer",
            "10.244.2.8",
            true,
            "2026-12-04T11:00:00Z",
            ports.clone(),
        );
        let older = pod("a-older", "10.244.2.7", true, "2026-12-04T10:00:00Z", ports);
        let mut with_shadow = (*slice()).clone();
        with_shadow.endpoints.as_mut().unwrap()[0].addresses = vec!["10.244.2.7".into()];
        let d = desired(&[newer, older], &[service()], &[Arc::new(with_shadow)]);
        let s = &d[&(at("10.96.0.10:80"), Proto::Tcp)];
        assert_eq!(s.to, at("10.244.2.7:8080"));
        assert!(!d.contains_key(&(at("10.244.2.7:8080"), Proto::Tcp)));
        assert_eq!(
            d[&(at("10.244.2.9:8080"), Proto::Tcp)].to,
            at("10.244.2.7:8080")
        );
    }

    #[test]
    fn a_single_unnamed_port_matches_its_endpointslice_port() {
        // `kubectl expose` makes a Service port without a name; its EndpointSlice says "".
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "nginx", "namespace": "team"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "targetPort": 80}]}
        }))
        .unwrap();
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "nginx-x", "namespace": "team",
                         "labels": {"kubernetes.io/service-name": "nginx"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.1.5"]}],
            "ports": [{"name": "", "port": 80, "protocol": "TCP"}]
        }))
        .unwrap();
        let shadow = pod(
            "s",
            "10.244.2.7",
            true,
            "2026-12-04T10:00:00Z",
            json!([{"containerPort": 80}]),
        );
        let d = desired(&[shadow], &[Arc::new(svc)], &[Arc::new(slice)]);
        assert_eq!(
            d[&(at("10.244.1.5:80"), Proto::Tcp)].to,
            at("10.244.2.7:80")
        );
        assert_eq!(d.len(), 2);
    }
}
