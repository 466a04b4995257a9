//! The inbound paths (issue 10): a client pod in the cluster calling the nginx's Service by its
//! ClusterIP, with the load the outbound paths get from the laptop.
//!
//! - `cluster-service`: the Service as it is, to the nginx pod (the baseline), measured twice
//!   in each repeat: before the router DaemonSet is installed and after it is removed;
//! - `exchange`: while `ktctl exchange` sends the Service to the laptop;
//! - `mesh-no-header` and `mesh-header`: through the router of `ktctl mesh`, without the
//!   developer's header (on to the nginx pod) and with it (on to the laptop);
//! - `cluster-service-router`: the Service as it is, with the router DaemonSet
//!   (deploy/router.yaml) loaded on every node and steering nothing of it: its cost on traffic
//!   it does not steer, against `cluster-service` from both sides of it in the same repeat
//!   (both also timed with the client and nginx pinned to one core: [`pinned`], which the
//!   router's goals read);
//! - `exchange-ebpf`: while `ktctl exchange --mode ebpf` has the routers steer the Service to
//!   the laptop, against `exchange` (selector mode).
//!
//! The laptop serves the same files from an nginx on its loopback with the pod's nginx
//! configuration, so that the server is not what differs from ktctl connect's outbound
//! figures, which exchange is compared with. The client pod and both shadows run on the nginx
//! pod's node; the mesh router has a preferred pod affinity to the Service's pods (no node
//! selector), and the report says where it landed.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kt_testbed::{Machine, Testbed, machine};

use super::bpfstats::{StatsOn, percent};
use super::load::{Origin, Sizes, Values, measure_path, push, wrk_percentile, wrk_requests};
use super::pinned;
use super::process::{Bg, bg, laptop, with_output};
use super::settle::settle;
use super::xdp::XdpPass;
use super::{Bench, SERVICE};

/// The client pod the load runs in.
const CLIENT: &str = "bench-client";
/// The laptop's nginx listens on 127.0.0.1 here; exchange and mesh expose it as the Service's
/// port 80.
const LOCAL_PORT: u16 = 18070;
/// Another Service (its own nginx), steered by a session while the router's cost on
/// [`SERVICE`] is measured once more ([`Inbound::steering_another`]).
const OTHER: &str = "bench-other";
/// The Service without the router, the path every other is compared with.
const BASE: &str = "cluster-service";
/// `--versionMark` of the mesh, and the header that selects its route.
const MARK: &str = "VERSION:bench";
const HEADER: &str = "VERSION: bench";

/// What the inbound paths need in every repeat.
pub(super) struct Inbound {
    client: Origin,
    /// Base URL of the Service, by its ClusterIP.
    base: String,
    /// Base URL of [`OTHER`], by its ClusterIP.
    other_base: String,
    _local: LocalNginx,
    /// The Service's selector before the run: what exchange and mesh must put back.
    selector: String,
    /// The nodes the mesh router ran on, and the nginx pod's.
    router_nodes: BTreeSet<String>,
    node: String,
}

impl Inbound {
    /// The client pod (on the nginx pod's node) and the laptop's nginx; fails if the Service is
    /// still held by an earlier session.
    pub(super) fn start(b: &Bench) -> Result<Inbound> {
        let (selector, annotations) = service_state(&b.tb)?;
        if annotations.contains("kt.dev/") {
            bail!(
                "service {SERVICE} is still changed by an earlier ktctl session ({annotations}); wait for its shadow to restore it, or run `ktctl recover {SERVICE}`"
            );
        }
        client_pod(b)?;
        pinned::install_tool(&b.tb, CLIENT, &b.xtask)?;
        super::nginx_service(&b.tb, OTHER, OTHER)?;
        Ok(Inbound {
            client: Origin::Pod(CLIENT.to_string()),
            base: format!("http://{}", b.service_ip),
            other_base: format!("http://{}", super::cluster_ip(&b.tb, OTHER)?),
            _local: LocalNginx::start(&b.tb, b.sizes.bulk_mib)?,
            selector,
            router_nodes: BTreeSet::new(),
            node: b.node.clone(),
        })
    }

    /// One repeat of the four paths.
    pub(super) fn measure(
        &mut self,
        b: &Bench,
        ktctl: &Path,
        raw: &mut BTreeMap<String, Values>,
        repeat: &str,
    ) -> Result<()> {
        eprintln!("bench: {repeat}: cluster -> Service");
        settle(&b.tb, "cluster -> Service")?;
        // After a session the Service may still go to the shadow or router for a moment.
        self.wait_served_by(b, None, "pod")?;
        self.service(b, raw, "cluster-service")?;
        {
            let _router = RouterDaemonSet::install(&b.tb)?;
            eprintln!("bench: {repeat}: cluster -> Service, the router loaded on every node");
            settle(&b.tb, "the router loaded")?;
            self.wait_served_by(b, None, "pod")?;
            self.service(b, raw, "cluster-service-router")?;
            if let Err(e) = router_cost(
                &b.tb,
                &self.client,
                &self.base,
                &b.sizes,
                raw.entry("cluster-service-router".into()).or_default(),
            ) {
                eprintln!("bench: no run time of the router's programs: {e:#}");
            }
            eprintln!("bench: {repeat}: cluster -> Service steered by the routers -> laptop");
            settle(&b.tb, "exchange --mode ebpf")?;
            self.exchange(
                b,
                ktctl,
                "ebpf",
                raw.entry("exchange-ebpf".into()).or_default(),
            )?;
        }
        // The baseline again, the router removed: the path with the router is compared with
        // samples from both sides of it, not with one taken minutes earlier on a shared machine.
        eprintln!("bench: {repeat}: cluster -> Service, the router removed");
        settle(&b.tb, "the router removed")?;
        self.wait_served_by(b, None, "pod")?;
        self.service(b, raw, "cluster-service")?;
        if let Err(e) = self.router_alternation(b, ktctl, raw, repeat) {
            eprintln!("bench: {repeat}: the router's pinned comparison ended early: {e:#}");
        }
        {
            let xdp = XdpPass::attach_node(&b.node)
                .with_context(|| format!("attaching XDP_PASS to the veths of {}", b.node))?;
            eprintln!(
                "bench: {repeat}: cluster -> Service, XDP_PASS on {}'s veths ({})",
                b.node,
                xdp.veths.join(", ")
            );
            settle(&b.tb, "XDP_PASS on the veths")?;
            self.service(b, raw, "cluster-service-xdp")?;
        }
        eprintln!("bench: {repeat}: cluster -> exchanged Service -> laptop");
        settle(&b.tb, "exchange")?;
        self.exchange(
            b,
            ktctl,
            "selector",
            raw.entry("exchange".into()).or_default(),
        )?;
        eprintln!("bench: {repeat}: cluster -> mesh router (without, with the header)");
        settle(&b.tb, "mesh")?;
        self.mesh(b, ktctl, raw)
    }

    /// The client pod's load on the Service by its ClusterIP, as the path `key`.
    fn service(&self, b: &Bench, raw: &mut BTreeMap<String, Values>, key: &str) -> Result<()> {
        measure_path(
            &b.tb,
            &self.client,
            &self.base,
            None,
            &b.sizes,
            raw.entry(key.into()).or_default(),
        )
    }

    /// The router's cost on the Service's traffic it does not steer, from pinned readings
    /// ([`pinned`]) taken alternately without the router and with it: `router_cycles` times with
    /// the router idle, then once while it steers another Service ([`OTHER`]). Each reading with
    /// the router is set against the mean of the two without it just before and after
    /// (`pinned_*_vs_without`; the goals take the median of these): a pinned figure still
    /// drifts by several per cent over a minute on a shared machine, in stretches of tens of
    /// seconds, so only readings this close together can be compared at 2%.
    fn router_alternation(
        &self,
        b: &Bench,
        ktctl: &Path,
        raw: &mut BTreeMap<String, Values>,
        repeat: &str,
    ) -> Result<()> {
        let mut readings = Vec::new();
        let result = self.alternate(b, ktctl, raw, repeat, &mut readings);
        for (key, ratio) in pinned::against_without(&readings, BASE) {
            let values = raw.entry(key.into()).or_default();
            push(values, "pinned_keepalive_p50_vs_without", Some(ratio.p50));
            push(values, "pinned_bulk_1_stream_vs_without", Some(ratio.bulk));
        }
        result
    }

    /// The readings of [`Inbound::router_alternation`], in order, into `readings`.
    fn alternate(
        &self,
        b: &Bench,
        ktctl: &Path,
        raw: &mut BTreeMap<String, Values>,
        repeat: &str,
        readings: &mut Vec<(&'static str, pinned::Sample)>,
    ) -> Result<()> {
        readings.push((BASE, self.pinned(b, raw, BASE)?));
        for cycle in 0..=b.sizes.router_cycles {
            let active = cycle == b.sizes.router_cycles;
            let key = if active {
                "cluster-service-router-active"
            } else {
                "cluster-service-router"
            };
            eprintln!(
                "bench: {repeat}: pinned, the router {} ({}/{})",
                if active {
                    format!("steering {OTHER}")
                } else {
                    "idle".to_string()
                },
                cycle + 1,
                b.sizes.router_cycles + 1
            );
            let with = {
                let _router = RouterDaemonSet::install(&b.tb)?;
                if active {
                    self.steering_another(b, ktctl, raw)?
                } else {
                    self.wait_served_by(b, None, "pod")?;
                    self.pinned(b, raw, key)?
                }
            };
            readings.push((key, with));
            self.wait_served_by(b, None, "pod")?;
            readings.push((BASE, self.pinned(b, raw, BASE)?));
        }
        Ok(())
    }

    /// A pinned reading of the Service ([`pinned`]) once the machine is quiet, recorded as the
    /// path `key`'s.
    fn pinned(
        &self,
        b: &Bench,
        raw: &mut BTreeMap<String, Values>,
        key: &str,
    ) -> Result<pinned::Sample> {
        settle(&b.tb, &format!("{key}, pinned"))?;
        let sample = pinned::measure(&b.tb, &self.client, &b.service_ip, &b.pod, &b.sizes)
            .with_context(|| format!("{key}: pinned figures"))?;
        sample.push(raw.entry(key.into()).or_default());
        Ok(sample)
    }

    /// A pinned reading of the Service ([`Inbound::pinned`]) while the routers steer another
    /// Service ([`OTHER`], by `exchange --mode ebpf`): their tc programs then parse each packet
    /// on the node and look its flow up, where on a node that steers nothing they leave it
    /// after one flag read.
    fn steering_another(
        &self,
        b: &Bench,
        ktctl: &Path,
        raw: &mut BTreeMap<String, Values>,
    ) -> Result<pinned::Sample> {
        let k = start_exchange(b, ktctl, OTHER, "ebpf")?;
        let sample = with_output(&k, || {
            self.wait_reached(b, &self.other_base, OTHER, None, "laptop")?;
            self.wait_served_by(b, None, "pod")?;
            self.pinned(b, raw, "cluster-service-router-active")
        })?;
        self.stop(b, k, &format!("exchange {OTHER} --mode ebpf"))?;
        Ok(sample)
    }

    /// What each inbound path was, for the report.
    pub(super) fn describe(&self) -> Vec<(String, String)> {
        let expose = format!("--expose {LOCAL_PORT}:80");
        let router = if self.router_nodes.is_empty() {
            "not started".to_string()
        } else {
            let nodes: Vec<&str> = self.router_nodes.iter().map(String::as_str).collect();
            format!("on {}", nodes.join(", "))
        };
        vec![
            (
                "cluster-service".into(),
                format!(
                    "from pod {CLIENT} (busybox:1, with this machine's wrk and curl) on the nginx pod's node, to service {SERVICE} by its ClusterIP; measured twice a repeat, before the router DaemonSet is installed and after it is removed, and its pinned figures (client and nginx's workers on one core) before and after each pinned reading with the router"
                ),
            ),
            (
                "exchange".into(),
                format!(
                    "`ktctl exchange {SERVICE} {expose}`, its shadow on the nginx pod's node; the laptop serves the same files from an nginx with the pod's configuration on 127.0.0.1:{LOCAL_PORT}"
                ),
            ),
            (
                "mesh-header".into(),
                format!(
                    "`ktctl mesh {SERVICE} {expose} --versionMark {MARK}`, each request with `{HEADER}`; its shadow on the nginx pod's node ({}), the router (preferred next to the Service's pods) {router}",
                    self.node
                ),
            ),
            (
                "mesh-no-header".into(),
                "the same mesh, requests without the header".into(),
            ),
            (
                "cluster-service-xdp".into(),
                format!(
                    "as cluster-service, with the smallest XDP program (`return XDP_PASS`) attached in native mode to every veth of the nginx pod's node ({}: its pods' host sides and its uplink), where the client pod and nginx both run",
                    self.node
                ),
            ),
            (
                "cluster-service-router".into(),
                "as cluster-service, with the router DaemonSet (deploy/router.yaml) loaded on every node and steering nothing of this Service; its pinned figures from readings that alternate with the Service's without the router (installed before each, removed after it)".into(),
            ),
            (
                "cluster-service-router-active".into(),
                format!(
                    "as cluster-service-router, while `ktctl exchange {OTHER} {expose} --mode ebpf` has the routers steer another Service (its own nginx pod), so that their tc programs parse every packet and look up its flow (pinned figures only)"
                ),
            ),
            (
                "exchange-ebpf".into(),
                format!(
                    "`ktctl exchange {SERVICE} {expose} --mode ebpf`: the routers steer the Service's ClusterIP to the shadow (on the nginx pod's node) inside the client's node"
                ),
            ),
        ]
    }

    /// One exchange in `mode` (`selector` or `ebpf`); `time_to_ready_s` is from the command to
    /// the first request served by the laptop.
    fn exchange(&self, b: &Bench, ktctl: &Path, mode: &str, values: &mut Values) -> Result<()> {
        self.wait_released(b)?;
        let start = Instant::now();
        let k = start_exchange(b, ktctl, SERVICE, mode)?;
        with_output(&k, || {
            self.wait_served_by(b, None, "laptop")?;
            push(
                values,
                "time_to_ready_s",
                Some(start.elapsed().as_secs_f64()),
            );
            measure_path(&b.tb, &self.client, &self.base, None, &b.sizes, values)
        })?;
        self.stop(b, k, &format!("exchange --mode {mode}"))
    }

    fn mesh(&mut self, b: &Bench, ktctl: &Path, raw: &mut BTreeMap<String, Values>) -> Result<()> {
        self.wait_released(b)?;
        let start = Instant::now();
        let expose = format!("{LOCAL_PORT}:80");
        let node = b.node_selector();
        let args = [
            "mesh",
            SERVICE,
            "--expose",
            &expose,
            "--versionMark",
            MARK,
            "--nodeSelector",
            &node,
        ];
        let ready = format!("Now you can access your service by header '{HEADER}'");
        let (k, _) = bg(&b.tb, ktctl, &args, &ready, Duration::from_secs(180))?;
        let router = with_output(&k, || {
            // The header's route reaching the laptop shows the Service goes to the router, so
            // requests without it go through the router too.
            self.wait_served_by(b, Some(HEADER), "laptop")?;
            let with = raw.entry("mesh-header".into()).or_default();
            push(with, "time_to_ready_s", Some(start.elapsed().as_secs_f64()));
            let router = laptop(
                &b.tb,
                &[
                    "kubectl",
                    "get",
                    "pod",
                    &format!("{SERVICE}-kt-router"),
                    "-o",
                    "jsonpath={.spec.nodeName}",
                ],
            )?;
            let without = raw.entry("mesh-no-header".into()).or_default();
            measure_path(&b.tb, &self.client, &self.base, None, &b.sizes, without)?;
            let with = raw.entry("mesh-header".into()).or_default();
            measure_path(
                &b.tb,
                &self.client,
                &self.base,
                Some(HEADER),
                &b.sizes,
                with,
            )?;
            Ok(router)
        })?;
        self.router_nodes.insert(router.trim().to_string());
        self.stop(b, k, "mesh")
    }

    /// Ctrl-C, as a user ends it; then the Service must be as it was before the run.
    fn stop(&self, b: &Bench, mut k: Bg, what: &str) -> Result<()> {
        match k.interrupt(Duration::from_secs(60)) {
            Some(status) if status.success() => {}
            Some(status) => bail!(
                "ktctl {what} ended with {status} on Ctrl-C; its output ended with:\n{}",
                k.output()
            ),
            None => bail!(
                "ktctl {what} did not end within 60 s of Ctrl-C; its output ended with:\n{}",
                k.output()
            ),
        }
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let (selector, annotations) = service_state(&b.tb)?;
            if selector == self.selector && !annotations.contains("kt.dev/") {
                return Ok(());
            }
            if Instant::now() > until {
                bail!(
                    "service {SERVICE} was not restored 30 s after ktctl {what} ended: selector {selector} (before: {}), annotations {annotations}",
                    self.selector
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Waits until no session holds the Service: the lock of an exchange goes with its session,
    /// a mesh's lock and router by garbage collection, and a new mesh would join a router that
    /// is terminating.
    fn wait_released(&self, b: &Bench) -> Result<()> {
        let until = Instant::now() + Duration::from_secs(90);
        loop {
            let left = laptop(
                &b.tb,
                &[
                    "kubectl",
                    "get",
                    "pods,services,configmaps,leases",
                    "-l",
                    &format!("kt.dev/mesh-of={SERVICE}"),
                    "-o",
                    "name",
                ],
            )? + &laptop(
                &b.tb,
                &[
                    "kubectl",
                    "get",
                    "lease",
                    &format!("{SERVICE}-kt-lock"),
                    "--ignore-not-found",
                    "-o",
                    "name",
                ],
            )?;
            if left.trim().is_empty() {
                return Ok(());
            }
            if Instant::now() > until {
                bail!(
                    "service {SERVICE} is still held 90 s after the last session ended: {}",
                    left.split_whitespace().collect::<Vec<_>>().join(", ")
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Waits until the client pod's requests (with `header`) to the Service reach the server
    /// whose `where` page says `want`: until then they may still go to the old endpoints.
    fn wait_served_by(&self, b: &Bench, header: Option<&str>, want: &str) -> Result<()> {
        self.wait_reached(b, &self.base, SERVICE, header, want)
    }

    /// Waits until the client's requests to `service` at `base` reach `want` (its `/where`
    /// says so).
    fn wait_reached(
        &self,
        b: &Bench,
        base: &str,
        service: &str,
        header: Option<&str>,
        want: &str,
    ) -> Result<()> {
        let start = Instant::now();
        let h = header.map(|h| format!(" -H '{h}'")).unwrap_or_default();
        let line = format!("curl -sS -m 2{h} {base}/where");
        loop {
            if let Ok(page) = self.client.sh(&b.tb, &line)
                && page.trim() == want
            {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!(
                    "requests from pod {CLIENT} to service {service} did not reach the {want} within 60 s"
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// `ktctl exchange service` in `mode` to the laptop's nginx, its shadow on the nginx pod's
/// node, once it says that requests are redirected.
fn start_exchange(b: &Bench, ktctl: &Path, service: &str, mode: &str) -> Result<Bg> {
    let expose = format!("{LOCAL_PORT}:80");
    let node = b.node_selector();
    let args = [
        "exchange",
        service,
        "--expose",
        &expose,
        "--mode",
        mode,
        "--nodeSelector",
        &node,
    ];
    let ready = format!("Now all request to service '{service}' will be redirected to local");
    let (k, _) = bg(&b.tb, ktctl, &args, &ready, Duration::from_secs(120))?;
    Ok(k)
}

/// The Service's selector and annotations (as JSON).
fn service_state(tb: &Testbed) -> Result<(String, String)> {
    let get = |path: &str| -> Result<String> {
        Ok(laptop(
            tb,
            &[
                "kubectl",
                "get",
                "service",
                SERVICE,
                "-o",
                &format!("jsonpath={{{path}}}"),
            ],
        )?
        .trim()
        .to_string())
    };
    Ok((get(".spec.selector")?, get(".metadata.annotations")?))
}

/// Starts the client pod on the nginx pod's node (again, if it runs elsewhere or has ended)
/// and waits until it is ready.
fn client_pod(b: &Bench) -> Result<()> {
    let found = laptop(
        &b.tb,
        &[
            "kubectl",
            "get",
            "pod",
            CLIENT,
            "--ignore-not-found",
            "-o",
            "jsonpath={.spec.nodeName} {.status.phase}",
        ],
    )?;
    let mut it = found.split_whitespace();
    let (node, phase) = (it.next(), it.next());
    let fine = node == Some(b.node.as_str()) && matches!(phase, Some("Running" | "Pending"));
    if node.is_some() && !fine {
        laptop(
            &b.tb,
            &["kubectl", "delete", "pod", CLIENT, "--timeout=60s"],
        )?;
    }
    if !fine {
        let overrides = format!(
            r#"{{"apiVersion":"v1","spec":{{"nodeSelector":{{"kubernetes.io/hostname":"{}"}}}}}}"#,
            b.node
        );
        laptop(
            &b.tb,
            &[
                "kubectl",
                "run",
                CLIENT,
                "--image=busybox:1",
                "--restart=Never",
                "--overrides",
                &overrides,
                "--",
                "sleep",
                "infinity",
            ],
        )?;
    }
    laptop(
        &b.tb,
        &[
            "kubectl",
            "wait",
            &format!("pod/{CLIENT}"),
            "--for=condition=Ready",
            "--timeout=90s",
        ],
    )?;
    // As in the laptop (see `run`): let TIME_WAIT ports be reused, or the port range, not the
    // path, sets the rate. wrk closes first on `Connection: close`, and the baseline alone
    // opened ~30,000 connections to the ClusterIP within seconds, which left the next path
    // without ports (its rate fell 9×). A pod may not set this sysctl (it is not in the
    // kubelet's safe set), so it is set from outside, in the pod's network namespace.
    let pid = super::pod_pids(&b.tb, &format!("run={CLIENT}"))
        .and_then(|p| p.first().copied())
        .with_context(|| format!("no process of pod {CLIENT} found"))?;
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])
        .output()
        .context("running nsenter")?;
    if !out.status.success() {
        bail!(
            "setting tcp_tw_reuse in pod {CLIENT}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let tw = Origin::Pod(CLIENT.into()).sh(&b.tb, "cat /proc/sys/net/ipv4/tcp_tw_reuse")?;
    if tw.trim() != "1" {
        bail!("tcp_tw_reuse in pod {CLIENT} is {tw:?} after setting it to 1");
    }
    Ok(())
}

/// An nginx on the laptop's loopback with the pod's nginx configuration (testbed/images/
/// nginx.conf: two workers, sendfile, the access log written) serving files of the same sizes
/// as the pod's; ended (by its pid) when dropped.
struct LocalNginx {
    child: Child,
    dir: PathBuf,
}

impl LocalNginx {
    fn start(tb: &Testbed, bulk_mib: u32) -> Result<LocalNginx> {
        let dir = std::env::temp_dir().join(format!("ktctl-bench-nginx-{}", std::process::id()));
        let html = dir.join("html");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&html)?;
        std::fs::write(html.join("1k"), [b'k'; 1024])?;
        std::fs::write(html.join("where"), "laptop\n")?;
        let mut bulk = std::fs::File::create(html.join("bulk"))?;
        std::io::copy(
            &mut std::fs::File::open("/dev/urandom")?.take(u64::from(bulk_mib) << 20),
            &mut bulk,
        )?;
        // The workers run as nobody.
        for (p, mode) in [(&dir, 0o755), (&html, 0o755)] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))?;
        }
        for f in ["1k", "where", "bulk"] {
            std::fs::set_permissions(html.join(f), std::fs::Permissions::from_mode(0o644))?;
        }
        let d = dir.display();
        let conf = format!(
            "daemon off;
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log notice;
events {{ worker_connections 4096; }}
http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    log_format main '$remote_addr - $remote_user [$time_local] \"$request\" '
                    '$status $body_bytes_sent \"$http_referer\" \"$http_user_agent\"';
    access_log {d}/access.log main;
    sendfile on;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};
    uwsgi_temp_path {d}; scgi_temp_path {d};
    server {{
        listen 127.0.0.1:{LOCAL_PORT};
        location / {{ root {d}/html; }}
    }}
}}
"
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let mut cmd = machine::command(&tb.layout, Machine::Laptop, "nginx")?;
        cmd.arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().context("starting the laptop's nginx")?;
        let mut s = LocalNginx { child, dir };
        let start = Instant::now();
        let url = format!("http://127.0.0.1:{LOCAL_PORT}/where");
        loop {
            let page = machine::output(
                &tb.layout,
                Machine::Laptop,
                &["curl", "-sf", "-m", "1", &url],
            )?;
            if page.status.success() && String::from_utf8_lossy(&page.stdout).trim() == "laptop" {
                return Ok(s);
            }
            let ended = s.child.try_wait()?.is_some();
            if ended || start.elapsed() > Duration::from_secs(10) {
                let log = std::fs::read_to_string(s.dir.join("error.log")).unwrap_or_default();
                bail!(
                    "the laptop's nginx on 127.0.0.1:{LOCAL_PORT} {}; its error log:\n{log}",
                    if ended {
                        "ended"
                    } else {
                        "did not answer within 10 s"
                    }
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for LocalNginx {
    fn drop(&mut self) {
        let pid = self.child.id();
        // SIGTERM: the master ends its workers, then itself. Once reaped its id may belong to
        // another process: never signal it again.
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on a child this process started and has not reaped.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        let until = Instant::now() + Duration::from_secs(10);
        while let Ok(None) = self.child.try_wait() {
            if Instant::now() > until {
                // The workers first (the master's children, by their ids), then the master.
                let workers = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                    .unwrap_or_default();
                for w in workers
                    .split_whitespace()
                    .filter_map(|w| w.parse::<i32>().ok())
                {
                    // SAFETY: kill(2) on a worker of the nginx this process started, whose
                    // master (its parent) has not been reaped.
                    unsafe { libc::kill(w, libc::SIGKILL) };
                }
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The router DaemonSet (deploy/router.yaml, the workspace's kt-router), installed and ready on
/// every node; removed, with its programs, when dropped.
struct RouterDaemonSet<'a> {
    tb: &'a Testbed,
    file: PathBuf,
}

impl<'a> RouterDaemonSet<'a> {
    fn install(tb: &'a Testbed) -> Result<RouterDaemonSet<'a>> {
        let dir = crate::build::workspace().join("target/bench");
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("router.yaml");
        std::fs::write(&file, crate::manifests::render(None)?)?;
        let r = RouterDaemonSet { tb, file };
        let f = r.file.display().to_string();
        laptop(tb, &["kubectl", "apply", "-f", &f])?;
        laptop(
            tb,
            &[
                "kubectl",
                "-n",
                "kt-system",
                "rollout",
                "status",
                "ds/kt-router",
                "--timeout=180s",
            ],
        )
        .context("the router DaemonSet did not become ready")?;
        Ok(r)
    }
}

impl Drop for RouterDaemonSet<'_> {
    fn drop(&mut self) {
        let f = self.file.display().to_string();
        if let Err(e) = laptop(
            self.tb,
            &[
                "kubectl",
                "delete",
                "-f",
                &f,
                "--ignore-not-found",
                "--wait=true",
            ],
        ) {
            eprintln!("bench: removing the router DaemonSet failed: {e:#}");
        }
    }
}

/// The router's programs' own run time on the Service's traffic, which they do not steer (see
/// `bpfstats`): per keep-alive small request, against that run's p50, and during one bulk
/// download, against its duration. Both are what the programs add to the path (they run in
/// line with every packet), whatever the end-to-end comparison's noise.
fn router_cost(
    tb: &Testbed,
    from: &Origin,
    base: &str,
    s: &Sizes,
    values: &mut Values,
) -> Result<()> {
    let stats = StatsOn::new()?;
    let before = stats.router()?;
    let ka = from.sh(
        tb,
        &format!("wrk -t1 -c1 -d{}s --latency {base}/1k", s.secs),
    )?;
    let spent = stats.router()? - before;
    let (Some(requests), Some(p50)) = (wrk_requests(&ka), wrk_percentile(&ka, "50%")) else {
        bail!("no request count or p50 in wrk's output:\n{ka}");
    };
    anyhow::ensure!(requests > 0, "wrk completed no request:\n{ka}");
    let per_request = spent.ns as f64 / requests as f64;
    push(values, "router_bpf_ns_per_request", Some(per_request));
    push(
        values,
        "router_bpf_runs_per_request",
        Some(spent.runs as f64 / requests as f64),
    );
    push(
        values,
        "router_bpf_p50_percent",
        Some(100.0 * per_request / (p50 * 1e6)),
    );
    let before = stats.router()?;
    let out = from.sh(
        tb,
        &format!("curl -sS -o /dev/null -m 300 -w '%{{time_total}}' {base}/bulk"),
    )?;
    let spent = stats.router()? - before;
    let secs: f64 = out
        .trim()
        .parse()
        .with_context(|| format!("curl's time_total: {out:?}"))?;
    push(
        values,
        "router_bpf_bulk_percent",
        percent(spent, secs * 1e9),
    );
    if spent.runs > 0 {
        push(
            values,
            "router_bpf_ns_per_run",
            Some(spent.ns as f64 / spent.runs as f64),
        );
    }
    Ok(())
}
