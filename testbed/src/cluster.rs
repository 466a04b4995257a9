//! `up`, `down`, `status` and `exec`: the testbed's stable interface for tests and benchmarks.

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::daemon::{Daemon, tail};
use crate::gobuild::{self, GoBinary};
use crate::layout::*;
use crate::machine::{
    self, cgroup, cgroup2_root, ip, ip_idempotent, list_netns, netns_path, sysctl,
};
use crate::pki::{self, Pki};

/// Options of `testbed up`.
#[derive(Clone, Copy, Debug)]
pub struct UpOptions {
    /// Number of nodes (1..=8); node 1 runs the control plane.
    pub nodes: u8,
}

impl Default for UpOptions {
    fn default() -> Self {
        UpOptions { nodes: 1 }
    }
}

/// One testbed instance (there is one per workspace).
#[derive(Clone, Debug)]
pub struct Testbed {
    pub layout: Layout,
}

/// The control plane components the multi-call binary provides (symlinked into bin/).
const CLUSTER_TOOLS: &[&str] = &[
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kube-proxy",
    "kubectl",
    "coredns",
];

impl Default for Testbed {
    fn default() -> Self {
        Testbed {
            layout: Layout::default_workspace(),
        }
    }
}

fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the testbed needs root (network namespaces, cgroups, mounts); run it as root");
    }
    Ok(())
}

fn waiting(what: &str, started: Instant, last: &mut Instant) {
    if last.elapsed() >= Duration::from_secs(5) {
        eprintln!("testbed: waiting for {what} ({:.0?})", started.elapsed());
        *last = Instant::now();
    }
}

impl Testbed {
    pub fn new(layout: Layout) -> Testbed {
        Testbed { layout }
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.layout.kubeconfig()
    }

    /// Nodes of the running testbed (0 when down).
    pub fn nodes(&self) -> u8 {
        Daemon::recorded(&self.layout)
            .iter()
            .filter(|d| d.name == "kt-node" && d.alive())
            .count() as u8
    }

    /// Whether the control plane answers.
    pub fn is_up(&self) -> bool {
        Daemon::running(&self.layout, Machine::Node(1), "kube-apiserver").is_some()
            && self
                .kubectl_in(Machine::Node(1), &["get", "--raw", "/readyz"])
                .is_ok_and(|o| o.status.success())
    }

    /// Brings the testbed up; returns at once if it is up with that many nodes.
    pub fn up(&self, opts: UpOptions) -> Result<()> {
        require_root()?;
        if !(1..=MAX_NODES).contains(&opts.nodes) {
            bail!("--nodes must be between 1 and {MAX_NODES}");
        }
        let l = &self.layout;
        let cluster_bin = gobuild::ensure(l, GoBinary::Cluster)?;
        let node_bin = gobuild::ensure(l, GoBinary::Node)?;
        self.link_tools(&cluster_bin, &node_bin)?;
        let mut have = self.nodes();
        if have != 0 && have != opts.nodes {
            eprintln!(
                "testbed: it runs {have} node(s), {} asked; recreating it",
                opts.nodes
            );
            self.down()?;
            have = 0;
        }
        // A running testbed made from other binaries (an older checkout) is recreated.
        let stamp = format!("{}\n{}\n", cluster_bin.display(), node_bin.display());
        let stamp_file = l.state().join("binaries");
        if have != 0 && fs::read_to_string(&stamp_file).ok().as_deref() != Some(stamp.as_str()) {
            eprintln!("testbed: its binaries changed; recreating it");
            self.down()?;
            have = 0;
        }
        if have == opts.nodes && self.is_up() && self.healthy().is_ok() {
            eprintln!(
                "testbed: up ({} node(s)); kubeconfig: {}",
                opts.nodes,
                l.kubeconfig().display()
            );
            return Ok(());
        }
        // Whatever an earlier testbed left (daemons that died with a reboot or a crash, their
        // namespaces, cgroups and pods) goes first: every machine is made afresh, so each node
        // gets its routes to all the others.
        let stale = leftovers();
        if have != 0 || !stale.is_empty() {
            eprintln!(
                "testbed: clearing what an earlier testbed left ({} item(s))",
                stale.len()
            );
            self.down()?;
        }
        let started = Instant::now();
        fs::create_dir_all(l.state())?;
        fs::write(&stamp_file, &stamp)?;
        let pki = pki::ensure(l, opts.nodes)?;
        fs::write(
            l.kubeconfig(),
            pki::kubeconfig(
                &pki,
                "kubernetes-admin",
                &pki.admin_cert(),
                &pki.admin_key(),
                "default",
            )?,
        )?;
        self.network(opts.nodes)?;
        self.write_configs(opts.nodes)?;
        self.start_control_plane(&pki, &cluster_bin)?;
        self.start_nodes(&pki, opts.nodes, &cluster_bin, &node_bin)?;
        self.bootstrap(opts.nodes)?;
        eprintln!(
            "testbed: up in {:.0?} ({} node(s)); kubeconfig: {}",
            started.elapsed(),
            opts.nodes,
            l.kubeconfig().display()
        );
        println!("{}", l.kubeconfig().display());
        Ok(())
    }

    /// bin/: kubectl and friends (symlinks to the multi-call binary), kt-node, and the
    /// workspace's binaries once built ([`Testbed::link_workspace_binaries`]).
    fn link_tools(&self, cluster: &Path, node: &Path) -> Result<()> {
        let bin = self.layout.bin();
        fs::create_dir_all(&bin)?;
        let link = |name: &str, target: &Path| -> Result<()> {
            let p = bin.join(name);
            if fs::read_link(&p).ok().as_deref() != Some(target) {
                let _ = fs::remove_file(&p);
                std::os::unix::fs::symlink(target, &p)
                    .with_context(|| format!("linking {}", p.display()))?;
            }
            Ok(())
        };
        link("kt-cluster", cluster)?;
        for t in CLUSTER_TOOLS {
            link(t, cluster)?;
        }
        link("kt-node", node)
    }

    /// Points bin/ktctl and bin/kt-router (the `kt-router:*` image) at a cargo profile's builds.
    pub fn link_workspace_binaries(&self, profile_dir: &Path) -> Result<()> {
        let bin = self.layout.bin();
        fs::create_dir_all(&bin)?;
        for name in ["ktctl", "kt-router"] {
            let target = profile_dir.join(name);
            let p = bin.join(name);
            let _ = fs::remove_file(&p);
            std::os::unix::fs::symlink(&target, &p)?;
        }
        Ok(())
    }

    /// The fabric (a bridge in its own namespace), the machines and their cgroups.
    fn network(&self, nodes: u8) -> Result<()> {
        let mut machines: Vec<Machine> = (1..=nodes).map(Machine::Node).collect();
        machines.push(Machine::Laptop);
        if !netns_path(FABRIC_NS).exists() {
            ip(&["netns", "add", FABRIC_NS])?;
        }
        ip_idempotent(&["-n", FABRIC_NS, "link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["-n", FABRIC_NS, "link", "set", BRIDGE, "up"])?;
        ip(&["-n", FABRIC_NS, "link", "set", "lo", "up"])?;
        let cg_root = cgroup2_root()?;
        for &m in &machines {
            let name = m.name();
            let cg = cg_root.join(&name);
            if !cg.exists() {
                fs::create_dir(&cg).with_context(|| format!("creating cgroup {}", cg.display()))?;
            }
            if netns_path(&name).exists() {
                continue;
            }
            ip(&["netns", "add", &name])?;
            let fab = format!("fab-{}", name.trim_start_matches("kt-"));
            ip(&[
                "-n", FABRIC_NS, "link", "add", &fab, "type", "veth", "peer", "name", "eth0",
                "netns", &name,
            ])?;
            ip(&["-n", FABRIC_NS, "link", "set", &fab, "master", BRIDGE, "up"])?;
            ip(&["-n", &name, "link", "set", "lo", "up"])?;
            ip(&["-n", &name, "link", "set", "eth0", "up"])?;
            match m {
                Machine::Laptop => {
                    // The laptop reaches the API server's address and nothing else.
                    ip(&[
                        "-n",
                        &name,
                        "addr",
                        "add",
                        &format!("{}/32", m.ip()),
                        "dev",
                        "eth0",
                    ])?;
                    ip(&[
                        "-n",
                        &name,
                        "route",
                        "add",
                        &format!("{}/32", api_server_ip()),
                        "dev",
                        "eth0",
                    ])?;
                }
                Machine::Node(n) => {
                    ip(&[
                        "-n",
                        &name,
                        "addr",
                        "add",
                        &format!("{}/{LAN_PREFIX}", m.ip()),
                        "dev",
                        "eth0",
                    ])?;
                    // Service IPs need a route for the first lookup; kube-proxy's DNAT then
                    // re-routes to an endpoint (a real node's default route plays this part).
                    ip(&["-n", &name, "route", "add", SERVICE_CIDR, "dev", "eth0"])?;
                    sysctl(&name, "net.ipv4.ip_forward", "1")?;
                    sysctl(&name, "net.ipv4.conf.all.rp_filter", "0")?;
                    for other in 1..=nodes {
                        if other != n {
                            let o = Machine::Node(other);
                            ip(&[
                                "-n",
                                &name,
                                "route",
                                "add",
                                &o.pod_cidr().unwrap_or_default(),
                                "via",
                                &o.ip().to_string(),
                            ])?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn write_configs(&self, nodes: u8) -> Result<()> {
        let l = &self.layout;
        let cfg = l.config();
        fs::create_dir_all(&cfg)?;
        for n in 1..=nodes {
            let m = Machine::Node(n);
            fs::write(
                cfg.join(format!("kube-proxy-{}.yaml", m.name())),
                format!(
                    "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
                     clientConnection:\n  kubeconfig: {kc}\nhostnameOverride: {name}\nbindAddress: {ip}\n\
                     clusterCIDR: {POD_CIDR}\nmode: nftables\n\
                     conntrack:\n  maxPerCore: 0\n  min: 0\n  tcpEstablishedTimeout: 0s\n  tcpCloseWaitTimeout: 0s\n\
                     metricsBindAddress: 127.0.0.1:10249\nhealthzBindAddress: 127.0.0.1:10256\n",
                    kc = l.kubeconfig().display(),
                    name = m.name(),
                    ip = m.ip()
                ),
            )?;
        }
        // The laptop's own resolver and resolv.conf (bind-mounted over /etc/resolv.conf in it).
        fs::write(
            cfg.join("laptop.Corefile"),
            format!(
                ".:53 {{\n    bind {LAPTOP_RESOLVER}\n    hosts {{\n        192.168.50.200 home.test\n        192.168.50.201 printer.home.test\n    }}\n    errors\n}}\n"
            ),
        )?;
        let etc = Layout::netns_etc(Machine::Laptop);
        fs::create_dir_all(&etc)?;
        fs::write(
            etc.join("resolv.conf"),
            format!("nameserver {LAPTOP_RESOLVER}\nsearch {LAPTOP_SEARCH}\n"),
        )?;
        Ok(())
    }

    fn start(&self, m: Machine, name: &str, args: Vec<String>) -> Result<Daemon> {
        if let Some(d) = Daemon::running(&self.layout, m, name) {
            return Ok(d);
        }
        Daemon::spawn(&self.layout, m, name, &args)
    }

    fn start_control_plane(&self, pki: &Pki, bin: &Path) -> Result<()> {
        let l = &self.layout;
        let node1 = Machine::Node(1);
        let b = |tool: &str| vec![bin.display().to_string(), tool.to_string()];
        let p = |path: PathBuf| path.display().to_string();
        let etcd_dir = l.state().join("etcd");
        let mut etcd = b("etcd");
        etcd.extend([
            "--name=kt".into(),
            format!("--data-dir={}", etcd_dir.display()),
            "--listen-client-urls=http://127.0.0.1:2379".into(),
            "--advertise-client-urls=http://127.0.0.1:2379".into(),
            "--listen-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-advertise-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-cluster=kt=http://127.0.0.1:2380".into(),
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ]);
        let d = self.start(node1, "etcd", etcd)?;
        self.wait("etcd", Duration::from_secs(60), &[&d], || {
            Ok(machine::output(
                l,
                node1,
                &["curl", "-fsS", "-m", "2", "http://127.0.0.1:2379/health"],
            )?
            .status
            .success())
        })?;

        let mut api = b("kube-apiserver");
        api.extend([
            format!("--advertise-address={}", api_server_ip()),
            "--bind-address=0.0.0.0".into(),
            "--secure-port=6443".into(),
            "--etcd-servers=http://127.0.0.1:2379".into(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            format!("--tls-cert-file={}", p(pki.apiserver_cert())),
            format!("--tls-private-key-file={}", p(pki.apiserver_key())),
            format!("--client-ca-file={}", p(pki.ca_cert())),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", p(pki.sa_pub())),
            format!("--service-account-signing-key-file={}", p(pki.sa_key())),
            "--authorization-mode=RBAC".into(),
            "--allow-privileged=true".into(),
            format!("--kubelet-client-certificate={}", p(pki.admin_cert())),
            format!("--kubelet-client-key={}", p(pki.admin_key())),
            "--kubelet-preferred-address-types=InternalIP".into(),
            format!("--cert-dir={}", p(l.state().join("apiserver"))),
            "--profiling=false".into(),
            "--event-ttl=1h".into(),
        ]);
        let api_d = self.start(node1, "kube-apiserver", api)?;
        self.wait(
            "kube-apiserver",
            Duration::from_secs(120),
            &[&api_d],
            || {
                Ok(self
                    .kubectl_in(node1, &["get", "--raw", "/readyz"])?
                    .status
                    .success())
            },
        )?;

        let kc = format!("--kubeconfig={}", p(l.kubeconfig()));
        let mut cm = b("kube-controller-manager");
        cm.extend([
            kc.clone(),
            "--leader-elect=false".into(),
            "--secure-port=0".into(),
            format!("--service-account-private-key-file={}", p(pki.sa_key())),
            format!("--root-ca-file={}", p(pki.ca_cert())),
            format!("--cluster-signing-cert-file={}", p(pki.ca_cert())),
            format!("--cluster-signing-key-file={}", p(pki.ca_key())),
            format!("--cluster-cidr={POD_CIDR}"),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
        ]);
        self.start(node1, "kube-controller-manager", cm)?;
        let mut sched = b("kube-scheduler");
        sched.extend([kc, "--leader-elect=false".into(), "--secure-port=0".into()]);
        self.start(node1, "kube-scheduler", sched)?;
        let mut dns = b("coredns");
        dns.extend(["-conf".into(), p(l.config().join("laptop.Corefile"))]);
        self.start(Machine::Laptop, "resolver", dns)?;
        Ok(())
    }

    fn start_nodes(&self, pki: &Pki, nodes: u8, cluster_bin: &Path, node_bin: &Path) -> Result<()> {
        let l = &self.layout;
        for n in 1..=nodes {
            let m = Machine::Node(n);
            let mut proxy = vec![cluster_bin.display().to_string(), "kube-proxy".into()];
            proxy.push(format!(
                "--config={}",
                l.config()
                    .join(format!("kube-proxy-{}.yaml", m.name()))
                    .display()
            ));
            self.start(m, "kube-proxy", proxy)?;
            let state = l.state().join(m.name());
            fs::create_dir_all(&state)?;
            let bpf = l.bpffs(m);
            mount_bpffs(&bpf)?;
            let args = vec![
                node_bin.display().to_string(),
                "run".into(),
                format!("--name={}", m.name()),
                format!("--node-ip={}", m.ip()),
                format!("--pod-cidr={}", m.pod_cidr().unwrap_or_default()),
                format!("--kubeconfig={}", l.kubeconfig().display()),
                format!("--state-dir={}", state.display()),
                format!("--cgroup={}", cgroup(m)?.display()),
                format!("--bpffs={}", bpf.display()),
                format!("--images={}", l.testbed_src().join("images.yaml").display()),
                format!("--bin-dir={}", l.bin().display()),
                format!("--cluster-bin={}", cluster_bin.display()),
                format!("--cluster-dns={CLUSTER_DNS}"),
                format!("--cluster-domain={CLUSTER_DOMAIN}"),
                format!("--tls-cert={}", pki.kubelet_cert(m).display()),
                format!("--tls-key={}", pki.kubelet_key(m).display()),
                format!("--client-ca={}", pki.ca_cert().display()),
                format!("--kubelet-version={KUBERNETES_VERSION}"),
            ];
            self.start(m, "kt-node", args)?;
        }
        Ok(())
    }

    /// Cluster add-ons and the readiness checks `up` promises.
    fn bootstrap(&self, nodes: u8) -> Result<()> {
        let l = &self.layout;
        let node1 = Machine::Node(1);
        let all = Daemon::recorded(l);
        let daemons: Vec<&Daemon> = all.iter().collect();
        self.wait(&format!("{nodes} node(s) Ready"), Duration::from_secs(120), &daemons, || {
            let o = self.kubectl_in(node1, &["get", "nodes", "-o", "jsonpath={range .items[*]}{.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}"])?;
            let text = String::from_utf8_lossy(&o.stdout);
            Ok(o.status.success() && text.lines().filter(|s| *s == "True").count() == nodes as usize)
        })?;
        let manifest = l.testbed_src().join("manifests/coredns.yaml");
        self.wait(
            "the CoreDNS manifest to apply",
            Duration::from_secs(60),
            &daemons,
            || {
                Ok(self
                    .kubectl_in(node1, &["apply", "-f", &manifest.display().to_string()])?
                    .status
                    .success())
            },
        )?;
        self.wait("CoreDNS Ready", Duration::from_secs(180), &daemons, || {
            let o = self.kubectl_in(
                node1,
                &[
                    "-n",
                    "kube-system",
                    "get",
                    "deploy/coredns",
                    "-o",
                    "jsonpath={.status.readyReplicas}",
                ],
            )?;
            Ok(String::from_utf8_lossy(&o.stdout).trim() == "1")
        })
        .map_err(|e| e.context(self.describe("kube-system", "k8s-app=kube-dns")))?;
        self.wait(
            "cluster DNS to answer",
            Duration::from_secs(60),
            &daemons,
            || {
                Ok(machine::output(
                    l,
                    node1,
                    &[
                        "kt-node",
                        "dns-probe",
                        &CLUSTER_DNS.to_string(),
                        "kubernetes.default.svc.cluster.local",
                    ],
                )?
                .status
                .success())
            },
        )?;
        self.wait(
            "the default ServiceAccount",
            Duration::from_secs(60),
            &daemons,
            || {
                Ok(self
                    .kubectl_in(node1, &["get", "serviceaccount", "default"])?
                    .status
                    .success())
            },
        )
    }

    /// `kubectl describe` of pods matching a selector, for error messages.
    fn describe(&self, ns: &str, selector: &str) -> String {
        self.kubectl_in(
            Machine::Node(1),
            &["-n", ns, "describe", "pods", "-l", selector],
        )
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
    }

    /// Polls `ready` until true; fails early, with its log, if one of `daemons` exits.
    fn wait(
        &self,
        what: &str,
        timeout: Duration,
        daemons: &[&Daemon],
        mut ready: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let started = Instant::now();
        let mut last = Instant::now();
        loop {
            for d in daemons {
                d.check(&self.layout)?;
            }
            if ready().unwrap_or(false) {
                return Ok(());
            }
            if started.elapsed() > timeout {
                let logs: Vec<String> = daemons
                    .iter()
                    .map(|d| {
                        format!(
                            "--- {} ({}):\n{}",
                            d.name,
                            d.machine,
                            tail(&Daemon::log_file(&self.layout, d.machine, &d.name), 10)
                        )
                    })
                    .collect();
                bail!(
                    "timed out after {timeout:?} waiting for {what}\n{}",
                    logs.join("\n")
                );
            }
            waiting(what, started, &mut last);
            sleep(Duration::from_millis(500));
        }
    }

    /// Stops one control-plane component (`kube-apiserver`, ...) on node 1, as an outage
    /// would: SIGTERM, then SIGKILL after 5 s. [`Testbed::start_component`] brings it back.
    pub fn stop_component(&self, name: &str) -> Result<()> {
        let d = Daemon::running(&self.layout, Machine::Node(1), name)
            .with_context(|| format!("{name} is not running"))?;
        d.stop(&self.layout, Duration::from_secs(5));
        Ok(())
    }

    /// Starts a stopped component again with its arguments, and waits until it serves
    /// (for the API server: /readyz).
    pub fn start_component(&self, name: &str) -> Result<()> {
        let node1 = Machine::Node(1);
        if Daemon::running(&self.layout, node1, name).is_some() {
            return Ok(());
        }
        let d = Daemon::respawn(&self.layout, node1, name)?;
        if name == "kube-apiserver" {
            self.wait(name, Duration::from_secs(120), &[&d], || {
                Ok(self
                    .kubectl_in(node1, &["get", "--raw", "/readyz"])?
                    .status
                    .success())
            })?;
        }
        Ok(())
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) a component on node 1: a frozen API server keeps
    /// its sockets open and answers nothing, so calls hang rather than fail, as they do when
    /// a network path to it silently drops packets.
    pub fn freeze_component(&self, name: &str, frozen: bool) -> Result<()> {
        let d = Daemon::running(&self.layout, Machine::Node(1), name)
            .with_context(|| format!("{name} is not running"))?;
        let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: kill(2) on a daemon the testbed started, checked by its start time.
        if unsafe { libc::kill(d.pid, sig) } != 0 {
            bail!("signalling {name}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Every daemon alive; names the first that is not.
    pub fn healthy(&self) -> Result<()> {
        for d in Daemon::recorded(&self.layout) {
            d.check(&self.layout)?;
        }
        Ok(())
    }

    /// kubectl inside a machine (the laptop reaches the API server as a developer would).
    pub fn kubectl_in(&self, m: Machine, args: &[&str]) -> Result<Output> {
        let mut all = vec!["kubectl", "--request-timeout=10s"];
        all.extend_from_slice(args);
        machine::output(&self.layout, m, &all)
    }

    /// kubectl from the laptop.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output> {
        self.kubectl_in(Machine::Laptop, args)
    }

    /// `testbed exec`: runs a command in a machine with the terminal attached; CMD's exit code.
    pub fn exec(&self, m: Machine, args: &[String]) -> Result<i32> {
        require_root()?;
        let (prog, rest) = args
            .split_first()
            .context("no command given (testbed exec MACHINE -- CMD...)")?;
        let mut cmd = machine::command(&self.layout, m, prog)?;
        cmd.args(rest);
        let status =
            run_passing_signals(&mut cmd).with_context(|| format!("running {prog} in {m}"))?;
        use std::os::unix::process::ExitStatusExt;
        Ok(status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
    }

    /// `testbed status`: each process, then the nodes and pods as the API server sees them.
    pub fn status(&self) -> Result<String> {
        let mut s = String::new();
        let daemons = Daemon::recorded(&self.layout);
        if daemons.is_empty() {
            return Ok("testbed: down\n".into());
        }
        for d in &daemons {
            s += &format!(
                "{:<10} {:<24} pid {:<8} {}\n",
                d.machine.name(),
                d.name,
                d.pid,
                if d.alive() { "running" } else { "EXITED" }
            );
        }
        if let Ok(o) = self.kubectl_in(Machine::Node(1), &["get", "nodes,pods", "-A", "-o", "wide"])
        {
            s += &String::from_utf8_lossy(&o.stdout);
            s += &String::from_utf8_lossy(&o.stderr);
        }
        Ok(s)
    }

    /// `testbed down`: ends every process it started and removes namespaces, veths, cgroups
    /// and files in /etc/netns; safe to repeat. Fails if anything is left behind.
    pub fn down(&self) -> Result<()> {
        require_root()?;
        let l = &self.layout;
        let mut daemons = Daemon::recorded(l);
        // Node agents first (no new pods), the API server last.
        daemons.sort_by_key(|d| match d.name.as_str() {
            "kt-node" => 0,
            "kube-apiserver" => 3,
            "etcd" => 4,
            _ => 1,
        });
        for d in &daemons {
            d.stop(l, Duration::from_secs(5));
        }
        // Every step runs even when an earlier one failed, so that one stuck item does not
        // leave the rest of the testbed behind; the failures are reported together.
        let mut errors: Vec<String> = vec![];
        let mut step = |r: Result<()>| {
            if let Err(e) = r {
                errors.push(format!("{e:#}"));
            }
        };
        // Pods' processes (and anything a test ran in a machine) live in the machines' cgroups.
        if let Ok(root) = cgroup2_root() {
            for name in machine_cgroups(&root) {
                step(kill_cgroup_tree(&root.join(&name)));
            }
        }
        for ns in list_netns(POD_NS_PREFIX) {
            step(ip(&["netns", "del", &ns]));
        }
        for n in 1..=MAX_NODES {
            let name = Machine::Node(n).name();
            if netns_path(&name).exists() {
                step(ip(&["netns", "del", &name]));
            }
        }
        for ns in [Machine::Laptop.name(), FABRIC_NS.to_string()] {
            if netns_path(&ns).exists() {
                step(ip(&["netns", "del", &ns]));
            }
        }
        let _ = fs::remove_dir_all(Layout::netns_etc(Machine::Laptop));
        // Pod state (volumes, logs) goes; component logs stay for post-mortems.
        for n in 1..=MAX_NODES {
            step(unmount_bpffs(&l.bpffs(Machine::Node(n))));
            let _ = fs::remove_dir_all(l.state().join(Machine::Node(n).name()));
        }
        // Testbed names are machine-wide, so a node bpf filesystem that a run cut short in
        // another checkout left is this testbed's leftover too; only a sweep clears it.
        for point in node_bpffs_mounts(&fs::read_to_string("/proc/self/mountinfo")?) {
            step(unmount_bpffs(Path::new(&point)));
        }
        let _ = fs::remove_dir_all(l.state().join("etcd"));
        let left = leftovers();
        if !left.is_empty() || !errors.is_empty() {
            bail!(
                "testbed down failed:\n  {}\nand left these behind:\n  {}",
                errors.join("\n  "),
                left.join("\n  ")
            );
        }
        eprintln!("testbed: down");
        Ok(())
    }
}

/// The signals that end a foreground command.
const ENDING_SIGNALS: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// Runs `cmd` to its end, passing on to it the ending signals that a process sends to this one
/// (`kill -INT <pid of testbed exec>`), which would otherwise end this process alone and leave
/// the command running in its machine. A terminal's Ctrl-C already reaches the command (the
/// whole foreground group gets it), so signals the kernel sent are not passed on twice.
fn run_passing_signals(
    cmd: &mut std::process::Command,
) -> std::io::Result<std::process::ExitStatus> {
    // SAFETY: plain C structs for which all zeroes is a valid value, filled by libc.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigset calls on a set we own; pthread_sigmask on this thread only. Threads
    // started from here on inherit the mask, and so would the child: a signal mask survives
    // exec, and std leaves it as it is (since Rust 1.86 or so). The child unblocks them again
    // between fork and exec, or a Ctrl-C or a passed-on signal would stay pending in it forever.
    unsafe {
        libc::sigemptyset(&mut set);
        for sig in ENDING_SIGNALS {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            // sigprocmask(2) is async-signal-safe, and `set` a copy made beforehand.
            if libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    // A pidfd names this child and no later process with its pid once it is reaped.
    // SAFETY: pidfd_open(2) of our unreaped child; the descriptor is ours.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    if pidfd < 0 {
        let e = std::io::Error::last_os_error();
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    // SAFETY: the kernel just returned this descriptor to us, and nothing else owns it.
    let pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(pidfd as i32) };
    std::thread::spawn(move || {
        loop {
            // SAFETY: as above; sigwaitinfo fills `info` for one of the blocked signals.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            let sig = unsafe { libc::sigwaitinfo(&set, &mut info) };
            if sig < 0 {
                continue;
            }
            if passed_on(info.si_code) {
                // SAFETY: pidfd_send_signal(2) through our descriptor of the child.
                unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        pidfd.as_raw_fd(),
                        sig,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    )
                };
            }
        }
    });
    child.wait()
}

/// Whether a signal with this `si_code` came from a process (kill, sigqueue, tkill), not from
/// the kernel (a terminal's Ctrl-C, a hang-up).
fn passed_on(si_code: libc::c_int) -> bool {
    si_code <= 0
}

/// The mount points of testbed node bpf filesystems (`…/testbed/state/kt-node-N.bpf`, of any
/// checkout) in `mountinfo` (`/proc/self/mountinfo`'s text).
fn node_bpffs_mounts(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let point = before.split(' ').nth(4)?;
            let fstype = after.split(' ').next()?;
            let (_, node) = point.rsplit_once("/testbed/state/kt-node-")?;
            let n = node.strip_suffix(".bpf")?;
            (fstype == "bpf" && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .then(|| point.to_string())
        })
        .collect()
}

/// Whether `dir` is a mount point.
pub fn mounted(dir: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = dir.display().to_string();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// Mounts a fresh bpf filesystem on `dir` (created), unless one is there.
fn mount_bpffs(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if mounted(dir) {
        return Ok(());
    }
    let target = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
    // SAFETY: mount(2) with NUL-terminated strings and no data.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mounting a bpf filesystem on {}", dir.display()));
    }
    Ok(())
}

/// Unmounts a node's bpf filesystem (its pins go with it) and removes the folder.
fn unmount_bpffs(dir: &Path) -> Result<()> {
    if mounted(dir) {
        let target = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
        // SAFETY: umount2(2) with a NUL-terminated path.
        if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("unmounting {}", dir.display()));
        }
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

/// The machines' cgroups under the v2 root.
fn machine_cgroups(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = (1..=MAX_NODES).map(|n| Machine::Node(n).name()).collect();
    v.push(Machine::Laptop.name());
    v.retain(|n| root.join(n).exists());
    v
}

/// Kills every process in a cgroup subtree (all of them the testbed's) and removes it.
fn kill_cgroup_tree(dir: &Path) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let mut pids = vec![];
        collect_pids(dir, &mut pids);
        if pids.is_empty() {
            break;
        }
        if Instant::now() > until {
            bail!("processes in {} survive SIGKILL: {pids:?}", dir.display());
        }
        if fs::write(dir.join("cgroup.kill"), "1").is_err() {
            for pid in pids {
                // SAFETY: kill(2); every process in the machine's cgroup was started by the testbed.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        sleep(Duration::from_millis(50));
    }
    remove_cgroup_tree(dir)
}

fn collect_pids(dir: &Path, out: &mut Vec<i32>) {
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok()),
        );
    }
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_pids(&e.path(), out);
            }
        }
    }
}

fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path())?;
            }
        }
    }
    // A cgroup folder is removed with rmdir even though it lists files. It stays busy for a
    // moment after its last process has left cgroup.procs (the kernel is still tearing the
    // killed tasks down), so EBUSY is retried for a while.
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(_) if !dir.exists() => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < until => {
                sleep(Duration::from_millis(50));
            }
            Err(e) => {
                return Err(e).with_context(|| format!("removing cgroup {}", dir.display()));
            }
        }
    }
}

/// What a testbed could leave on the machine: processes in its cgroups, its cgroups, its
/// network namespaces, veths in the root namespace, /etc/netns files and mounts under its
/// state folder. Empty when clean.
pub fn leftovers() -> Vec<String> {
    let mut out = vec![];
    if let Ok(root) = cgroup2_root() {
        for name in machine_cgroups(&root) {
            let mut pids = vec![];
            collect_pids(&root.join(&name), &mut pids);
            out.push(format!(
                "cgroup {} (processes {pids:?})",
                root.join(&name).display()
            ));
        }
    }
    for ns in list_netns("kt") {
        out.push(format!("network namespace {ns}"));
    }
    if let Ok(o) = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
    {
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let name = line
                .split(':')
                .nth(1)
                .unwrap_or("")
                .trim()
                .split('@')
                .next()
                .unwrap_or("");
            if name.starts_with("ktv") || name.starts_with("fab-") || name == BRIDGE {
                out.push(format!("interface {name} in the root namespace"));
            }
        }
    }
    if Layout::netns_etc(Machine::Laptop).exists() {
        out.push(format!("{}", Layout::netns_etc(Machine::Laptop).display()));
    }
    if let Ok(info) = fs::read_to_string("/proc/self/mountinfo") {
        for line in info.lines() {
            if let Some(point) = line.split(' ').nth(4)
                && (point.contains("/testbed/state/") || point.starts_with("/run/netns/kt"))
            {
                out.push(format!("mount {point}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_gets_the_ending_signals_unblocked() {
        let out = std::env::temp_dir().join(format!("kt-testbed-sigblk-{}", std::process::id()));
        // Not through a shell: dash clears its signal mask when it starts.
        let mut cmd = std::process::Command::new("grep");
        cmd.args(["SigBlk", "/proc/self/status"])
            .stdout(fs::File::create(&out).unwrap());
        // On a thread of its own: this blocks the ending signals in the calling thread.
        let status = std::thread::spawn(move || run_passing_signals(&mut cmd))
            .join()
            .unwrap()
            .unwrap();
        assert!(status.success());
        let line = fs::read_to_string(&out).unwrap();
        let _ = fs::remove_file(&out);
        let mask = u64::from_str_radix(line.trim().trim_start_matches("SigBlk:").trim(), 16)
            .unwrap_or_else(|e| panic!("{line:?}: {e}"));
        for sig in ENDING_SIGNALS {
            assert_eq!(mask & (1 << (sig - 1)), 0, "signal {sig} blocked: {line}");
        }
    }

    #[test]
    fn signals_from_processes_are_passed_on_and_the_terminals_are_not() {
        assert!(passed_on(libc::SI_USER), "kill(2)");
        assert!(passed_on(libc::SI_QUEUE), "sigqueue(3)");
        assert!(passed_on(libc::SI_TKILL), "tgkill(2)");
        assert!(!passed_on(libc::SI_KERNEL), "a terminal's Ctrl-C");
    }

    #[test]
    fn only_node_bpf_filesystems_of_a_testbed_are_swept() {
        let info = "\
22 1 0:21 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:7 - bpf bpf rw,mode=700
90 1 0:40 / /tmp/ktci/target/testbed/state/kt-node-1.bpf rw,nosuid,nodev,noexec shared:50 - bpf bpf rw
91 1 0:41 / /work/main/target/testbed/state/kt-node-12.bpf rw,nosuid,nodev,noexec shared:51 - bpf bpf rw
92 1 0:42 / /work/main/target/testbed/state/kt-node-2.bpf rw shared:52 - tmpfs tmpfs rw
93 1 0:43 / /work/main/target/testbed/state/kt-node-.bpf rw shared:53 - bpf bpf rw
94 1 0:44 / /work/main/target/testbed/state/kt-node-3.bpf/x rw shared:54 - bpf bpf rw
95 1 0:45 / /run/netns/kt-laptop rw shared:55 - nsfs nsfs rw
";
        assert_eq!(
            node_bpffs_mounts(info),
            [
                "/tmp/ktci/target/testbed/state/kt-node-1.bpf",
                "/work/main/target/testbed/state/kt-node-12.bpf"
            ]
        );
    }
}
