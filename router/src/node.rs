//! `kt-router node`: the router DaemonSet's role on each node (deploy/router.yaml).
//!
//! It loads the tc steering programs once, attaches them to every pod interface of its node
//! (and to new ones as pods come: rtnetlink link events), and keeps the steering map equal to
//! what Kubernetes says ([`desired`]): the ready shadow pods labelled `kt.dev/steer-service`,
//! their Services and EndpointSlices, watched cluster-wide. With `--cgroup` (the node's root
//! cgroup) it also steers the node's own sockets (hostNetwork pods, node processes) at
//! `connect()`/`sendmsg()`. Services meshed with `mesh --mode ebpf` are steered to the node's
//! own mesh proxies ([`mesh`]). Each steering change is one JSON log line. On SIGTERM it
//! detaches from every interface and exits; so does a crash, since its links die with the
//! process. With `--pin-dir` the flows under way live in maps pinned on the node's bpf
//! filesystem: a router stopping for a rollout or an eviction leaves them to the next one,
//! which takes them over, so that connections steered before the restart keep their shadow;
//! an uninstall (the DaemonSet or its namespace deleted) removes them, leaving nothing on the
//! node.

mod desired;
mod links;
mod mesh;

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kt_common::changes::{MESH_EBPF, STEER_LABEL};
use kt_common::steer::{Timeouts, counter};
use kube::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::Notify;

use crate::mesh::{WatchBackoff, terminated};
use crate::shadow;
use crate::steer::{Attached, Steering, TcAttach};
use desired::Desired;

/// How often the programs' counters are logged (when they changed).
const COUNTERS_EVERY: Duration = Duration::from_secs(60);
/// How often expired flows are swept (and the tc programs turned off once nothing is left).
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// The node role's readiness port (hostNetwork: it is the node's port).
pub const HEALTH_PORT: u16 = 9967;

#[derive(clap::Args)]
pub struct Args {
    /// This node's name (the DaemonSet passes spec.nodeName), for the logs
    #[arg(long, env = "NODE_NAME", default_value = "")]
    node: String,
    /// Port of the readiness listener, bound once the programs are attached and the first
    /// steering applied (0: none)
    #[arg(long, default_value_t = HEALTH_PORT)]
    health_port: u16,
    /// Seconds an idle steered TCP flow is remembered (0: an hour)
    #[arg(long, default_value_t = 0)]
    tcp_idle: u64,
    /// Seconds an idle steered UDP flow is remembered (0: two minutes)
    #[arg(long, default_value_t = 0)]
    udp_idle: u64,
    /// The node's root cgroup (cgroup v2; the DaemonSet mounts the host's /sys/fs/cgroup),
    /// to steer callers in the node's own network namespace: hostNetwork pods and node
    /// processes. Without it only pods with a network namespace of their own are steered
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// This node's IP (the DaemonSet passes status.hostIP): the node's mesh proxies for
    /// `mesh --mode ebpf` listen there. Without it no Service is meshed on this node
    #[arg(long, env = "NODE_IP")]
    node_ip: Option<std::net::Ipv4Addr>,
    /// A cgroup under --cgroup whose processes are never steered: the kubelet's (its probes and
    /// port-forwards must reach the pods they name). Repeatable; missing ones are skipped
    #[arg(long = "exempt-cgroup", value_name = "PATH", default_values_t = KUBELET_CGROUPS.map(String::from))]
    exempt_cgroups: Vec<String>,
    /// How the tc programs attach to the pods' interfaces: TCX links (Linux >= 6.6), netlink
    /// filters on a clsact qdisc (older kernels, or beside tools that only use those), or
    /// whichever the kernel has
    #[arg(long, value_enum, default_value_t = TcAttach::Auto)]
    tc_attach: TcAttach,
    /// A folder on the node's bpf filesystem (the DaemonSet mounts the host's /sys/fs/bpf)
    /// where the flows under way are pinned, so that the next router on this node (a rollout,
    /// an eviction, a crash) takes them over and connections steered before it keep their
    /// shadow. Without it, or off a bpf filesystem, a restarted router forgets them
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<PathBuf>,
    /// The DaemonSet running this router, in --namespace: while it stays, a stopping router
    /// leaves its flows pinned for the next one; once it or its namespace is being deleted
    /// (an uninstall), the pins go too. Without it they always go
    #[arg(long, requires = "pin_dir")]
    daemonset: Option<String>,
    /// The namespace of --daemonset (the DaemonSet passes metadata.namespace)
    #[arg(long, env = "POD_NAMESPACE", default_value = "kt-system")]
    namespace: String,
}

/// Where kubelets run on common distributions (systemd units; k3s and MicroK8s embed theirs).
const KUBELET_CGROUPS: [&str; 4] = [
    "system.slice/kubelet.service",
    "system.slice/k3s.service",
    "system.slice/k3s-agent.service",
    "system.slice/snap.microk8s.daemon-kubelite.service",
];

/// cgroup2's `statfs` magic.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Attaches the sock_addr programs to the node's root cgroup for sockets in this process's
/// network namespace (the node's: the DaemonSet is hostNetwork), the kubelet's exempt.
fn attach_host(
    steering: &mut Steering,
    cgroup: &Path,
    exempt: &[String],
    node: &str,
) -> Result<()> {
    let f_type = crate::steer::fs_magic(cgroup)?;
    if f_type != CGROUP2_SUPER_MAGIC {
        anyhow::bail!(
            "{} is not a cgroup v2 folder (the node needs the unified hierarchy)",
            cgroup.display()
        );
    }
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").context("a socket for the namespace")?;
    let cookie = kt_common::bpf::netns_cookie(sock.as_fd())
        .context("reading the node's network namespace cookie (Linux >= 5.14)")?;
    let mut exempted = 0;
    for rel in exempt {
        let dir = cgroup.join(rel.trim_start_matches('/'));
        if !dir.is_dir() {
            tracing::debug!(node, cgroup = %rel, "no such cgroup to exempt");
            continue;
        }
        steering.exempt_cgroup(&dir)?;
        tracing::info!(node, cgroup = %rel, "its processes are never steered");
        exempted += 1;
    }
    if exempted == 0 {
        tracing::warn!(
            node,
            "none of the --exempt-cgroup folders exists: if the kubelet runs in the node's network namespace, its probes of exchanged pods go to the shadow"
        );
    }
    steering.attach_host(cgroup, cookie)
}

/// The pin folder to use: `--pin-dir` if it can hold pins (a warning says why not).
fn usable_pins(args: &Args) -> Option<&Path> {
    let dir = args.pin_dir.as_deref()?;
    match crate::steer::prepare_pins(dir) {
        Ok(()) => Some(dir),
        Err(e) => {
            tracing::warn!(node = %args.node, error = %format!("{e:#}"), "flows are not pinned: a restarted router forgets the connections it steered");
            None
        }
    }
}

/// Whether another router will follow this one on the node: its DaemonSet stays (a rollout,
/// an eviction, a node drain). Gone or being deleted, with its namespace or its rights (an
/// uninstall, `kubectl delete -f` in any order), or run by hand (no `--daemonset`): nobody
/// will. If the API server cannot say, the flows stay: a leftover map is only memory, which
/// the next router on the node takes over.
async fn successor_expected(client: &kube::Client, args: &Args) -> bool {
    use k8s_openapi::api::apps::v1::DaemonSet;
    use k8s_openapi::api::core::v1::Namespace;
    let Some(name) = args.daemonset.as_deref() else {
        return false;
    };
    let check = async {
        let ds = Api::<DaemonSet>::namespaced(client.clone(), &args.namespace)
            .get_opt(name)
            .await?;
        let ns = Api::<Namespace>::all(client.clone())
            .get_opt(&args.namespace)
            .await?;
        Ok::<_, kube::Error>(follows(
            ds.as_ref().map(|d| &d.metadata),
            ns.as_ref().map(|n| &n.metadata),
        ))
    };
    match tokio::time::timeout(Duration::from_secs(3), check).await {
        Ok(Ok(stays)) => stays,
        Ok(Err(e)) => {
            let stays = follows_despite(&e);
            if stays {
                tracing::warn!(node = %args.node, error = %e, "cannot tell whether a router follows; leaving the flows pinned");
            }
            stays
        }
        Err(_) => {
            tracing::warn!(node = %args.node, "the API server did not say in 3 s whether a router follows; leaving the flows pinned");
            true
        }
    }
}

/// Whether a router follows, from the DaemonSet and its namespace as the API server has them
/// (`None`: not found): both there and neither being deleted.
fn follows(ds: Option<&ObjectMeta>, ns: Option<&ObjectMeta>) -> bool {
    let stays = |m: Option<&ObjectMeta>| m.is_some_and(|m| m.deletion_timestamp.is_none());
    stays(ds) && stays(ns)
}

/// Whether a router follows when asking failed: not if the router's rights are gone (an
/// uninstall removes the ClusterRole too), otherwise nobody can tell, and the flows stay.
fn follows_despite(e: &kube::Error) -> bool {
    !matches!(e, kube::Error::Api(s) if s.code == 401 || s.code == 403)
}

pub async fn run(args: Args) -> Result<()> {
    let pins = usable_pins(&args);
    let mut steering = match pins {
        Some(dir) => Steering::load_pinned(dir)?,
        None => Steering::load()?,
    };
    steering.set_tc_attach(args.tc_attach);
    steering.set_timeouts(Timeouts {
        tcp_ns: args.tcp_idle.saturating_mul(1_000_000_000),
        udp_ns: args.udp_idle.saturating_mul(1_000_000_000),
        closing_ns: 0,
    })?;
    if let Some(cg) = &args.cgroup {
        attach_host(&mut steering, cg, &args.exempt_cgroups, &args.node).with_context(|| {
            format!(
                "steering the node's own sockets through cgroup {} (--cgroup)",
                cg.display()
            )
        })?;
        tracing::info!(node = %args.node, cgroup = %cg.display(), "attached to the node's cgroup");
    }
    // Flows taken over from an earlier router need the tc programs on before they attach.
    let swept = steering.sweep().context("sweeping the flow maps")?;
    if swept.live > 0 {
        tracing::info!(node = %args.node, flows = swept.live, "flows under way taken over");
    }
    let mut active = swept.active;
    let mut events = links::LinkEvents::open().context("watching the node's links")?;
    let mut attached = BTreeMap::new();
    attach_new(&mut steering, &mut attached, &args.node)?;

    let client = kube::Client::try_default()
        .await
        .context("connecting to the API server")?;
    let changed = Arc::new(Notify::new());
    let pods = reflect(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().labels(STEER_LABEL),
        &changed,
    );
    let (mesh_store, mesh_watch) = reflect(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().labels(MESH_EBPF),
        &changed,
    );
    tokio::spawn(mesh_watch);
    let mut meshes = match args.node_ip {
        Some(ip) => Some(mesh::Meshes::new(
            ip,
            steering
                .flow_reader()
                .context("reading the flows for the mesh proxies")?,
        )),
        None => {
            tracing::warn!(node = %args.node, "no --node-ip (NODE_IP): Services meshed with --mode ebpf are not steered on this node");
            None
        }
    };
    let services = reflect(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        &changed,
    );
    let slices = reflect(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
        &changed,
    );
    let (pod_store, pod_watch) = pods;
    let (svc_store, svc_watch) = services;
    let (slice_store, slice_watch) = slices;
    tokio::spawn(pod_watch);
    tokio::spawn(svc_watch);
    tokio::spawn(slice_watch);
    let listed = async {
        pod_store.wait_until_ready().await?;
        mesh_store.wait_until_ready().await?;
        svc_store.wait_until_ready().await?;
        slice_store.wait_until_ready().await
    };
    listed.await.context(
        "listing pods, services and endpointslices (the ClusterRole in deploy/router.yaml)",
    )?;
    let mut current = Desired::new();
    let stores = Stores {
        pods: pod_store,
        mesh_pods: mesh_store,
        services: svc_store,
        slices: slice_store,
    };
    let first = stores.want(&mut meshes).await;
    apply(&mut steering, &mut current, first);
    let health =
        shadow::health_listener(std::net::Ipv4Addr::UNSPECIFIED.into(), args.health_port).await?;
    tracing::info!(node = %args.node, interfaces = attached.len(), steered = current.len(), "node router ready");

    let health = shadow::serve_health(health);
    let stop = terminated();
    futures::pin_mut!(health, stop);
    let mut report = tokio::time::interval(COUNTERS_EVERY);
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    let mut reported = [0; counter::COUNT as usize];
    loop {
        tokio::select! {
            () = &mut stop => break,
            () = &mut health => {}
            _ = report.tick() => match steering.counters() {
                Ok(c) if c != reported => {
                    tracing::info!(
                        steered = c[counter::STEERED as usize],
                        rewritten = c[counter::REWRITTEN as usize],
                        expired = c[counter::EXPIRED as usize],
                        fragments = c[counter::FRAGMENT as usize],
                        errors = c[counter::ERROR as usize],
                        host_steered = c[counter::HOST_STEERED as usize],
                        host_restored = c[counter::HOST_RESTORED as usize],
                        "steering counters"
                    );
                    reported = c;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot read the counters"),
            },
            _ = sweep.tick() => match steering.sweep() {
                Ok(swept) => {
                    if swept.active != active {
                        tracing::info!(node = %args.node, active = swept.active, flows = swept.live, "tc programs {}", if swept.active { "on" } else { "off: nothing steered, no flow left" });
                        active = swept.active;
                    }
                    if swept.removed > 0 {
                        tracing::debug!(node = %args.node, removed = swept.removed, live = swept.live, "expired flows swept");
                    }
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot sweep the flow maps"),
            },
            r = events.changed() => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "reading link events failed; looking again in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                if let Err(e) = attach_new(&mut steering, &mut attached, &args.node) {
                    tracing::warn!(error = %format!("{e:#}"), "cannot list the node's interfaces");
                }
            }
            () = changed.notified() => {
                // Let a burst of events (a rollout, an EndpointSlice update per pod) settle.
                tokio::time::sleep(Duration::from_millis(20)).await;
                let next = stores.want(&mut meshes).await;
                apply(&mut steering, &mut current, next);
            }
        }
    }
    for (index, (name, a)) in std::mem::take(&mut attached) {
        if let Err(e) = steering.detach(a) {
            tracing::warn!(interface = %name, index, error = %format!("{e:#}"), "detaching failed");
        }
    }
    steering.detach_host();
    if let Some(dir) = pins {
        if successor_expected(&client, &args).await {
            tracing::info!(node = %args.node, pins = %dir.display(), "flows left pinned for the next router on this node");
        } else if let Err(e) = crate::steer::unpin(dir) {
            tracing::warn!(node = %args.node, error = %format!("{e:#}"), "cannot remove the pinned flows");
        } else {
            tracing::info!(node = %args.node, pins = %dir.display(), "pinned flows removed: no router follows on this node");
        }
    }
    tracing::info!(node = %args.node, "node router stopped; programs detached");
    Ok(())
}

/// What the node's steering is computed from.
struct Stores {
    pods: Store<Pod>,
    mesh_pods: Store<Pod>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
}

impl Stores {
    /// The steering wanted now: exchanges' shadows, then meshed Services (their proxies
    /// started or stopped to match).
    async fn want(&self, meshes: &mut Option<mesh::Meshes>) -> Desired {
        let (services, slices) = (self.services.state(), self.slices.state());
        let mut want = desired::desired(&self.pods.state(), &services, &slices);
        if let Some(m) = meshes {
            let meshed = desired::meshed(&self.mesh_pods.state(), &services, &slices);
            m.apply(meshed, &mut want).await;
        }
        want
    }
}

/// A reflector of `api` and its watch (to spawn); every change notifies `changed`.
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: &Arc<Notify>,
) -> (Store<K>, impl std::future::Future<Output = ()> + use<K>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let changed = changed.clone();
    let kind = K::kind(&()).into_owned();
    let watch = async move {
        let events =
            reflector::reflector(writer, watcher(api, config)).backoff(WatchBackoff::default());
        futures::pin_mut!(events);
        while let Some(e) = events.next().await {
            match e {
                Ok(_) => changed.notify_one(),
                Err(e) => tracing::warn!(kind, error = %e, "watch failed; retrying"),
            }
        }
    };
    (store, watch)
}

/// Attaches to pod interfaces not yet attached; forgets the ones gone (their links went with
/// them).
fn attach_new(
    steering: &mut Steering,
    attached: &mut BTreeMap<u32, (String, Attached)>,
    node: &str,
) -> Result<()> {
    let now = links::pod_interfaces().context("listing the node's interfaces")?;
    attached.retain(|index, (name, _)| {
        let keep = now.contains_key(index);
        if !keep {
            tracing::info!(node, interface = %name, index, "pod interface gone");
        }
        keep
    });
    for (index, name) in now {
        if attached.contains_key(&index) {
            continue;
        }
        match steering.attach(&name) {
            Ok(a) => {
                tracing::info!(node, interface = %name, index, "attached to a pod interface");
                attached.insert(index, (name, a));
            }
            // Gone meanwhile, or not ours to touch: the next link event looks again.
            Err(e) => {
                tracing::warn!(node, interface = %name, index, error = %format!("{e:#}"), "cannot attach")
            }
        }
    }
    Ok(())
}

/// Makes the steering map equal to `want`, one log line per change.
fn apply(steering: &mut Steering, current: &mut Desired, want: Desired) {
    for ((from, proto), old) in current.iter() {
        if want.contains_key(&(*from, *proto)) {
            continue;
        }
        match steering.unsteer(*from, *proto) {
            Ok(()) => {
                tracing::info!(change = "unsteer", from = %from, proto = ?proto, to = %old.to, service = %old.service, shadow = %old.shadow, "steering stopped")
            }
            Err(e) => {
                tracing::error!(change = "unsteer", from = %from, error = %format!("{e:#}"), "cannot stop steering")
            }
        }
    }
    for ((from, proto), s) in &want {
        if current.get(&(*from, *proto)) == Some(s) {
            continue;
        }
        match steering.steer(*from, *proto, s.to) {
            Ok(()) => {
                tracing::info!(change = "steer", from = %from, proto = ?proto, to = %s.to, service = %s.service, shadow = %s.shadow, "steering started")
            }
            Err(e) => {
                tracing::error!(change = "steer", from = %from, to = %s.to, error = %format!("{e:#}"), "cannot steer")
            }
        }
    }
    *current = want;
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn meta(deleting: bool) -> ObjectMeta {
        ObjectMeta {
            deletion_timestamp: deleting.then_some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn a_router_follows_only_while_its_daemonset_and_namespace_stay() {
        let (here, going) = (meta(false), meta(true));
        assert!(follows(Some(&here), Some(&here)), "a rollout, an eviction");
        assert!(!follows(None, Some(&here)), "the DaemonSet deleted");
        assert!(
            !follows(Some(&going), Some(&here)),
            "the DaemonSet being deleted"
        );
        assert!(
            !follows(Some(&here), Some(&going)),
            "its namespace being deleted"
        );
        assert!(!follows(Some(&here), None), "its namespace gone");
    }

    #[test]
    fn without_its_rights_a_router_is_being_uninstalled_and_otherwise_cannot_tell() {
        let api = |code| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                ..Default::default()
            }))
        };
        assert!(!follows_despite(&api(403)));
        assert!(!follows_despite(&api(401)));
        assert!(
            follows_despite(&api(500)),
            "the flows stay when nobody can tell"
        );
        assert!(follows_despite(&api(429)));
    }
}
