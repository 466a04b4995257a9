//! What a node steers, computed from Kubernetes alone: the ready shadow pods labelled
//! [`STEER_LABEL`]`=<service>`, their Service and its EndpointSlices. Every node steers the
//! same set (a caller can sit on any node).
//!
//! For each Service port whose target port the shadow serves (one of its container ports):
//! the ClusterIP and port, and every endpoint address of the Service (the original pods) on
//! that target port, go to the shadow's IP on the target port. A shadow steers only its own
//! namespace's Service; two shadows claiming the same address: the older pod wins.
//!
//! A Service meshed in ebpf mode (ready shadows labelled [`MESH_EBPF`]`=<service>` in its
//! namespace) has its TCP ports ([`meshed`]) steered to the node's own mesh proxies instead;
//! the node loop adds those.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kt_common::changes::{MESH_EBPF, MESH_HEADER, MESH_VALUE, STEER_LABEL};

use crate::mesh::routes::Route;
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

/// The IP of a pod that is running, Ready and not being deleted.
fn ready_ip(pod: &Pod) -> Option<Ipv4Addr> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
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
    status.pod_ip.as_deref()?.parse().ok()
}

fn shadow(pod: &Pod) -> Option<Shadow<'_>> {
    let meta = &pod.metadata;
    if meta.deletion_timestamp.is_some() {
        return None;
    }
    let service = meta.labels.as_ref()?.get(STEER_LABEL)?;
    let ip = ready_ip(pod)?;
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
        let Some(svc) = find_service(services, s.namespace, s.service) else {
            continue;
        };
        for port in service_ports(svc, slices, &shadow_ips) {
            if !s.serves.contains(&(port.target, port.proto)) {
                continue;
            }
            let steer = Steer {
                to: SocketAddrV4::new(s.ip, port.target),
                service: format!("{}/{}", s.namespace, s.service),
                shadow: format!("{}/{}", s.namespace, s.name),
            };
            for from in port.from {
                out.entry((from, port.proto))
                    .or_insert_with(|| steer.clone());
            }
        }
    }
    out
}

fn find_service<'a>(services: &'a [Arc<Service>], ns: &str, name: &str) -> Option<&'a Service> {
    services
        .iter()
        .find(|x| {
            x.metadata.namespace.as_deref() == Some(ns) && x.metadata.name.as_deref() == Some(name)
        })
        .map(|x| x.as_ref())
}

/// One port of a Service and the addresses callers reach it by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub port: u16,
    /// The pods' port (the target port, resolved when named).
    pub target: u16,
    pub proto: Proto,
    pub cluster_ip: Option<Ipv4Addr>,
    /// ClusterIP:port (first, if any), then every endpoint podIP:target but those in
    /// `exclude`.
    pub from: Vec<SocketAddrV4>,
}

/// The ports of `svc` (TCP and UDP) with their addresses, from its EndpointSlices.
fn service_ports(
    svc: &Service,
    slices: &[Arc<EndpointSlice>],
    exclude: &BTreeSet<Ipv4Addr>,
) -> Vec<ServicePort> {
    let (ns, name) = (
        svc.metadata.namespace.as_deref(),
        svc.metadata.name.as_deref(),
    );
    let slices: Vec<&EndpointSlice> = slices
        .iter()
        .filter(|e| {
            e.metadata.namespace.as_deref() == ns
                && e.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("kubernetes.io/service-name"))
                    .map(String::as_str)
                    == name
        })
        .map(|e| e.as_ref())
        .collect();
    let spec = svc.spec.as_ref();
    let cluster_ip = spec
        .and_then(|x| x.cluster_ip.as_deref())
        .and_then(|ip| ip.parse::<Ipv4Addr>().ok());
    let mut out = vec![];
    for port in spec.and_then(|x| x.ports.as_ref()).into_iter().flatten() {
        let Some(p) = proto(port.protocol.as_deref()) else {
            continue;
        };
        let Ok(svc_port) = u16::try_from(port.port) else {
            continue;
        };
        let slice_ports = |e: &EndpointSlice| -> Vec<u16> {
            e.ports
                .iter()
                .flatten()
                .filter(|ep| {
                    same_name(&ep.name, &port.name) && proto(ep.protocol.as_deref()) == Some(p)
                })
                .filter_map(|ep| ep.port.and_then(|n| u16::try_from(n).ok()))
                .collect()
        };
        let target = match &port.target_port {
            None => Some(svc_port),
            Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
            // A named port: its number as the EndpointSlices give it.
            Some(IntOrString::String(_)) => {
                slices.iter().find_map(|e| slice_ports(e).first().copied())
            }
        };
        let Some(target) = target else {
            continue;
        };
        let mut from: Vec<SocketAddrV4> = cluster_ip
            .map(|ip| SocketAddrV4::new(ip, svc_port))
            .into_iter()
            .collect();
        for e in &slices {
            let ports = slice_ports(e);
            let addrs = e
                .endpoints
                .iter()
                .flatten()
                .flat_map(|ep| ep.addresses.iter())
                .filter_map(|a| a.parse::<Ipv4Addr>().ok())
                .filter(|a| !exclude.contains(a));
            for a in addrs {
                from.extend(ports.iter().map(|&n| SocketAddrV4::new(a, n)));
            }
        }
        out.push(ServicePort {
            port: svc_port,
            target,
            proto: p,
            cluster_ip,
            from,
        });
    }
    out
}

/// A Service meshed in ebpf mode: its TCP ports (what the node's mesh proxies listen for)
/// and the routes of its ready shadows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mesh {
    /// `<namespace>/<service>`.
    pub service: String,
    pub ports: Vec<ServicePort>,
    /// One per ready shadow, oldest first (the first match wins).
    pub routes: Vec<Route>,
}

/// The Services that ready shadows labelled [`MESH_EBPF`]`=<service>` mesh (in their
/// namespace), sorted by Service, with those shadows' routes: requests carrying the header
/// and value of the shadow's annotations go to the shadow's IP. A shadow whose annotations
/// make no route is left out (ktctl never writes such).
pub fn meshed(
    pods: &[Arc<Pod>],
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
) -> Vec<Mesh> {
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
    let mut by_service: BTreeMap<(&str, &str), Vec<Route>> = BTreeMap::new();
    for pod in pods {
        let meta = &pod.metadata;
        let (Some(ns), Some(name), Some(svc), Some(ip)) = (
            meta.namespace.as_deref(),
            meta.name.as_deref(),
            meta.labels.as_ref().and_then(|l| l.get(MESH_EBPF)),
            ready_ip(pod),
        ) else {
            continue;
        };
        let note = |k: &str| {
            meta.annotations
                .as_ref()
                .and_then(|a| a.get(k))
                .map_or("", String::as_str)
        };
        match Route::parse(
            note(MESH_HEADER),
            note(MESH_VALUE),
            &ip.to_string(),
            format!("{ns}/{name}"),
        ) {
            Ok(r) => by_service.entry((ns, svc.as_str())).or_default().push(r),
            Err(e) => {
                tracing::debug!(shadow = %format!("{ns}/{name}"), error = %e, "no route from this shadow")
            }
        }
    }
    let mut out = vec![];
    for ((ns, name), routes) in by_service {
        let Some(svc) = find_service(services, ns, name) else {
            continue;
        };
        let ports: Vec<ServicePort> = service_ports(svc, slices, &BTreeSet::new())
            .into_iter()
            .filter(|p| p.proto == Proto::Tcp)
            .collect();
        out.push(Mesh {
            service: format!("{ns}/{name}"),
            ports,
            routes,
        });
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

    /// A mesh shadow created `second` seconds into 2026, with the route `version: value`.
    fn mesh_pod(name: &str, ip: &str, ready: bool, second: u8, value: &str) -> Arc<Pod> {
        let created = format!("2026-01-01T00:00:{second:02}Z");
        let ports = json!([{"containerPort": 8080}]);
        let mut p = (*pod(name, ip, ready, &created, ports)).clone();
        p.metadata.labels = Some([(MESH_EBPF.to_string(), "nginx".to_string())].into());
        p.metadata.annotations = Some(
            [
                (MESH_HEADER.to_string(), "version".to_string()),
                (MESH_VALUE.to_string(), value.to_string()),
            ]
            .into(),
        );
        Arc::new(p)
    }

    #[test]
    fn a_meshed_service_gets_its_tcp_ports_and_one_route_per_ready_shadow_oldest_first() {
        let pods = [
            mesh_pod("bob", "10.244.2.4", true, 2, "bob"),
            mesh_pod("ann", "10.244.1.3", true, 1, "ann"),
            mesh_pod("cid", "10.244.1.4", false, 0, "cid"),
            mesh_pod("bad", "10.244.1.6", true, 0, "has space "),
        ];
        let got = meshed(&pods, &[service()], &[slice()]);
        assert_eq!(got.len(), 1, "{got:?}");
        let m = &got[0];
        assert_eq!(m.service, "team/nginx");
        let targets: Vec<String> = m
            .routes
            .iter()
            .map(|r| format!("{}={} {}", r.header, r.value.to_str().unwrap(), r.target))
            .collect();
        assert_eq!(
            targets,
            ["version=ann 10.244.1.3", "version=bob 10.244.2.4"]
        );
        let ports: Vec<(u16, u16, Vec<SocketAddrV4>)> = m
            .ports
            .iter()
            .map(|p| (p.port, p.target, p.from.clone()))
            .collect();
        assert_eq!(
            ports,
            [
                (
                    80,
                    8080,
                    vec![
                        at("10.96.0.10:80"),
                        at("10.244.1.5:8080"),
                        at("10.244.2.9:8080")
                    ]
                ),
                (
                    9000,
                    9000,
                    vec![
                        at("10.96.0.10:9000"),
                        at("10.244.1.5:9000"),
                        at("10.244.2.9:9000")
                    ]
                ),
            ],
            "TCP ports only, ClusterIP first"
        );
        // Meshing asks nothing of the exchange steering.
        assert!(desired(&pods, &[service()], &[slice()]).is_empty());
    }

    #[test]
    fn no_mesh_without_a_ready_shadow_with_a_route_or_without_its_service() {
        let not_ready = [mesh_pod("cid", "10.244.1.4", false, 0, "cid")];
        assert!(meshed(&not_ready, &[service()], &[slice()]).is_empty());
        let no_route = [mesh_pod("bad", "10.244.1.6", true, 0, "")];
        assert!(meshed(&no_route, &[service()], &[slice()]).is_empty());
        let ready = [mesh_pod("ann", "10.244.1.3", true, 1, "ann")];
        assert!(meshed(&ready, &[], &[slice()]).is_empty());
    }
}
