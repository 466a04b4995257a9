//! `cargo xtask bench`: every path to the same nginx pod measured side by side in one run on
//! the testbed, with ratios to the baselines of that run. Numbers are reported, never asserted.
//!
//! Outbound paths, from the laptop: `raw` (the laptop given a temporary route to the pod
//! network: the testbed's limit), `port-forward` (kubectl port-forward to the pod),
//! `kt-connect` (alibaba/kt-connect's `ktctl connect`, when a binary of it is given; else the
//! report says why not), `ktctl` (ktctl connect, to the pod IP), `ktctl-forward` (the
//! port-forward alone, by direction: see [`forward`]). Inbound paths, from a client pod in the
//! cluster: see [`inbound`].
//!
//! Layout: this file runs the outbound paths and the run; [`inbound`] the inbound ones;
//! [`load`] is the load every path gets; [`report`] makes the table, goals and plot;
//! [`ktconnect`] runs kt-connect without letting it touch this machine; [`process`] starts and
//! ends what runs in the laptop; [`tool`] holds the small clients the benchmark runs inside
//! the testbed.

mod bpfstats;
mod forward;
mod inbound;
mod ktconnect;
mod load;
mod pinned;
mod process;
mod profile;
mod report;
mod settle;
pub mod tool;
mod xdp;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kt_testbed::{Machine, Testbed, UpOptions, machine};

use load::{Origin, Sizes, Values, measure_path, push};
use process::{Bg, Group, Restore, bg, laptop, sh, with_output};
use profile::{Profile, Workload};
use report::Report;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// A reduced set (shorter runs, smaller files, one repeat): a smoke run for CI
    #[arg(long)]
    pub quick: bool,
    /// Repeats of each measurement (min/median/max are reported)
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Write the table into README.md's Performance section
    #[arg(long)]
    pub readme: bool,
    /// kt-connect's ktctl binary (v0.3.7) to measure beside ktctl; without it the report says
    /// why kt-connect is not measured. Build it from its tag with Go 1.18 (its go.mod's
    /// version; newer Go may fail on its old golang.org/x modules):
    /// `git clone --depth 1 --branch v0.3.7 https://github.com/alibaba/kt-connect &&
    /// cd kt-connect && GOTOOLCHAIN=go1.18.10 go build -ldflags "-X main.version=v0.3.7" -o
    /// ktctl ./cmd/ktctl`. The benchmark runs `ktctl --version` and refuses any other version
    #[arg(long, env = "KT_CONNECT_BIN", verbatim_doc_comment)]
    pub kt_connect: Option<PathBuf>,
    /// Which workloads to profile with perf (flame graphs beside the report): those of the
    /// goals ktctl missed, all, or none. The quick run profiles one, to keep the path working
    #[arg(long, value_enum, default_value_t = Profiles::Missed)]
    pub profile: Profiles,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profiles {
    Missed,
    All,
    None,
}

impl Args {
    pub fn quick() -> Args {
        Args {
            quick: true,
            repeats: 1,
            readme: false,
            kt_connect: std::env::var_os("KT_CONNECT_BIN").map(PathBuf::from),
            profile: Profiles::Missed,
        }
    }
}

/// The benchmark's nginx, whose files every path fetches.
struct Nginx {
    pod: String,
    ip: String,
    node: String,
    /// The ClusterIP of its Service ([`SERVICE`]).
    service_ip: String,
}

/// The Service in front of the benchmark's nginx (the inbound paths go through it).
const SERVICE: &str = "bench-nginx";

/// Creates the benchmark's nginx with a 1 KiB page, a bulk file and a page `where` that says
/// "pod" (the laptop's says "laptop"), and a Service in front of it.
fn fixtures(tb: &Testbed, bulk_mib: u32) -> Result<Nginx> {
    nginx_service(tb, "bench-nginx", SERVICE)?;
    let found = first_pod(
        tb,
        "app=bench-nginx",
        "{.metadata.name} {.status.podIP} {.spec.nodeName}",
    )?;
    let [pod, ip, node] = found.split_whitespace().collect::<Vec<_>>()[..] else {
        bail!("the nginx pod has no name, IP or node yet: {found:?}");
    };
    let (pod, ip, node) = (pod.to_string(), ip.to_string(), node.to_string());
    laptop(
        tb,
        &[
            "kubectl",
            "exec",
            &pod,
            "--",
            "sh",
            "-c",
            &format!(
                "head -c 1024 /dev/zero | tr '\\0' k > /usr/share/nginx/html/1k; head -c {}M /dev/urandom > /usr/share/nginx/html/bulk; echo pod > /usr/share/nginx/html/where",
                bulk_mib
            ),
        ],
    )?;
    let service_ip = cluster_ip(tb, SERVICE)?;
    Ok(Nginx {
        pod,
        ip,
        node,
        service_ip,
    })
}

/// An nginx Deployment `deployment` (one pod) with the Service `service` in front of it, created
/// unless there, and ready.
fn nginx_service(tb: &Testbed, deployment: &str, service: &str) -> Result<()> {
    let exists = |what: &str| -> Result<bool> {
        Ok(
            machine::output(&tb.layout, Machine::Laptop, &["kubectl", "get", what])?
                .status
                .success(),
        )
    };
    if !exists(&format!("deploy/{deployment}"))? {
        laptop(
            tb,
            &[
                "kubectl",
                "create",
                "deployment",
                deployment,
                "--image=nginx:alpine",
                "--port=80",
            ],
        )?;
    }
    if !exists(&format!("service/{service}"))? {
        laptop(
            tb,
            &[
                "kubectl",
                "expose",
                "deployment",
                deployment,
                "--name",
                service,
                "--port=80",
                "--target-port=80",
            ],
        )?;
    }
    laptop(
        tb,
        &[
            "kubectl",
            "rollout",
            "status",
            &format!("deploy/{deployment}"),
            "--timeout=90s",
        ],
    )?;
    Ok(())
}

/// The ClusterIP of `service`.
fn cluster_ip(tb: &Testbed, service: &str) -> Result<String> {
    let ip = laptop(
        tb,
        &[
            "kubectl",
            "get",
            "service",
            service,
            "-o",
            "jsonpath={.spec.clusterIP}",
        ],
    )?
    .trim()
    .to_string();
    if ip.is_empty() || ip == "None" {
        bail!("service {service} has no ClusterIP");
    }
    Ok(ip)
}

/// A field of /proc/PID/status in MiB (VmRSS: now, VmHWM: the peak).
fn status_mib(pid: u32, field: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Fields (a jsonpath within one pod) of the first pod `selector` selects.
fn first_pod(tb: &Testbed, selector: &str, fields: &str) -> Result<String> {
    let jsonpath = format!("jsonpath={{range .items[0:1]}}{fields}{{end}}");
    Ok(laptop(
        tb,
        &["kubectl", "get", "pod", "-l", selector, "-o", &jsonpath],
    )?
    .trim()
    .to_string())
}

/// The processes of the first pod `selector` selects (of all its containers).
fn pod_pids(tb: &Testbed, selector: &str) -> Option<Vec<u32>> {
    let pod = first_pod(tb, selector, "{.metadata.uid} {.spec.nodeName}").ok()?;
    let mut it = pod.split_whitespace();
    let (uid, node) = (it.next()?, it.next()?);
    let dir = machine::cgroup(Machine::parse(node)?)
        .ok()?
        .join("pods")
        .join(uid);
    let mut pids = vec![];
    for container in std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok()) {
        if let Ok(procs) = std::fs::read_to_string(container.path().join("cgroup.procs")) {
            pids.extend(
                procs
                    .split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    (!pids.is_empty()).then_some(pids)
}

/// The peak RSS of a pod: the sum over every process of its containers (one for kt-router;
/// sshd's listener and session processes for kt-connect's shadow).
fn pod_hwm_mib(tb: &Testbed, selector: &str) -> Option<f64> {
    let total: f64 = pod_pids(tb, selector)?
        .into_iter()
        .filter_map(|pid| status_mib(pid, "VmHWM:"))
        .sum();
    (total > 0.0).then_some(total)
}

/// A hooks profile makes this many times a connect-rate run's connections (enough samples).
const HOOKS_PROFILE_RUNS: usize = 5;

/// The label of ktctl connect's shadow pod.
const SHADOW: &str = "kt.dev/role=shadow-connect";

/// How many pods `selector` selects.
fn pod_count(tb: &Testbed, selector: &str) -> Result<usize> {
    Ok(
        laptop(tb, &["kubectl", "get", "pod", "-l", selector, "-o", "name"])?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count(),
    )
}

/// What the benchmark needs in every repeat.
struct Bench {
    tb: Testbed,
    sizes: Sizes,
    /// The nginx pod's name and IP.
    pod: String,
    ip: String,
    /// The nginx pod's node: the shadows go there too (as port-forward goes to that node's
    /// kubelet), so that where the scheduler puts them adds no cross-node hop to some runs.
    node: String,
    /// The ClusterIP of the nginx's Service.
    service_ip: String,
    /// This program, for the `bench-tool` helpers.
    xtask: PathBuf,
}

impl Bench {
    /// The laptop reaches the pod network by a temporary route, removed right after.
    fn raw(&self, values: &mut Values) -> Result<()> {
        let route = format!(
            "ip route add {} via {} dev eth0 onlink",
            kt_testbed::layout::POD_CIDR,
            kt_testbed::layout::api_server_ip()
        );
        sh(&self.tb, &route)?;
        let _route = Restore(
            self.tb.clone(),
            format!("ip route del {}", kt_testbed::layout::POD_CIDR),
        );
        measure_path(
            &self.tb,
            &Origin::Laptop,
            &format!("http://{}", self.ip),
            None,
            &self.sizes,
            values,
        )
    }

    fn port_forward(&self, values: &mut Values) -> Result<()> {
        let kubectl = self.tb.layout.bin().join("kubectl");
        let (_pf, _) = bg(
            &self.tb,
            &kubectl,
            &["port-forward", &format!("pod/{}", self.pod), "18090:80"],
            "Forwarding from",
            Duration::from_secs(30),
        )?;
        measure_path(
            &self.tb,
            &Origin::Laptop,
            "http://127.0.0.1:18090",
            None,
            &self.sizes,
            values,
        )
    }

    /// The loopback server the hooks' cost is measured against.
    fn listener(&self) -> Result<Bg> {
        let args = ["bench-tool", "listen", "127.0.0.1:18099"];
        let (listener, _) = bg(
            &self.tb,
            &self.xtask,
            &args,
            "listening",
            Duration::from_secs(10),
        )?;
        Ok(listener)
    }

    /// `ktctl connect`, its shadow on the nginx pod's node, once it says it is ready.
    fn connect(&self, ktctl: &std::path::Path) -> Result<Bg> {
        let args = ["connect", "--nodeSelector", &self.node_selector()];
        let (k, _) = bg(
            &self.tb,
            ktctl,
            &args,
            "All looks good",
            Duration::from_secs(120),
        )?;
        Ok(k)
    }

    /// `n` connect()s to the loopback listener, from two threads.
    fn connect_rate_args(&self, n: usize) -> Result<Vec<String>> {
        let xtask = self.xtask.to_str().context("non-UTF-8 path")?;
        Ok([xtask, "bench-tool", "connect-rate", "127.0.0.1:18099"]
            .iter()
            .map(|a| a.to_string())
            .chain([n.to_string(), "2".to_string()])
            .collect())
    }

    /// `perf record` in the laptop into `data`: of `pids` for the run's duration, or of
    /// `command` (see [`profile::record_args`]).
    fn record(&self, data: &std::path::Path, pids: &[u32], command: &[String]) -> Result<()> {
        let command: Vec<&str> = command.iter().map(String::as_str).collect();
        let data = data.to_str().context("non-UTF-8 path")?;
        let args = profile::record_args(data, pids, self.sizes.secs, &command);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = laptop(&self.tb, &args);
        if out.is_err() {
            let _ = std::fs::remove_file(data);
        }
        out.map(drop)
    }

    /// The share of a loopback connect()'s CPU time in cgroup BPF programs, with ktctl's
    /// hooks attached: their cost, read from a profile of many connects (the rate itself
    /// moves by more than 2% between runs on a shared machine). `None` without perf.
    fn hooks_bpf_share(&self) -> Result<Option<f64>> {
        if profile::available().is_err() {
            return Ok(None);
        }
        let dir = self.tb.layout.target.join("bench");
        std::fs::create_dir_all(&dir)?;
        let data = dir.join("hooks.data");
        let tool = self.connect_rate_args(self.sizes.conn_rate_n * HOOKS_PROFILE_RUNS)?;
        self.record(&data, &[], &tool)?;
        Ok(Some(profile::bpf_percent(&profile::take_folded(&data)?)))
    }

    /// connect() to a loopback server from the laptop: the best rate and the least CPU time per
    /// connection of five runs.
    fn connect_rate(&self) -> Result<(f64, f64)> {
        let args = self.connect_rate_args(self.sizes.conn_rate_n)?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (mut rate, mut cpu) = (0f64, f64::INFINITY);
        for _ in 0..5 {
            let out = laptop(&self.tb, &args)?;
            let mut it = out.split_whitespace().map(str::parse::<f64>);
            let (Some(Ok(r)), Some(Ok(c))) = (it.next(), it.next()) else {
                bail!("connect-rate printed {out:?}");
            };
            rate = rate.max(r);
            cpu = cpu.min(c);
        }
        Ok((rate, cpu))
    }

    /// ktctl connect to the pod IP; also what its hooks cost other traffic: loopback connect()s
    /// just before ktctl starts, and again as soon as it carries a request (before the load,
    /// which would leave the machine in another state). Two ratios: of the rates, and of the
    /// connecting process's CPU time per connection (without / with; the same cost without
    /// the scheduling noise of a shared machine, which moves the rate by more than 2%).
    fn ktctl(&self, ktctl: &std::path::Path, values: &mut Values) -> Result<()> {
        let _listener = self.listener()?;
        let without = self.connect_rate()?;
        let start = Instant::now();
        let k = self.connect(ktctl)?;
        with_output(&k, || {
            self.ready(start, values)?;
            let with = self.connect_rate()?;
            push(values, "hooks_connect_rate_ratio", Some(with.0 / without.0));
            push(values, "hooks_connect_cpu_ratio", Some(without.1 / with.1));
            let share = self.hooks_bpf_share().unwrap_or_else(|e| {
                eprintln!("bench: no profile of the hooks: {e:#}");
                None
            });
            push(values, "hooks_bpf_cpu_percent", share);
            self.client(k.pid(), SHADOW, values)
        })
    }

    /// Profiles of ktctl and its shadow under `wanted` workloads (with the goals each explains),
    /// through a ktctl connect of their own; flame graphs and folded stacks go into `dir`.
    fn profiles(
        &self,
        ktctl: &std::path::Path,
        wanted: BTreeMap<Workload, Vec<String>>,
        dir: &std::path::Path,
    ) -> Vec<Profile> {
        let failed = |w: Workload, goals: &[String], why: String| Profile {
            workload: w,
            goals: goals.to_vec(),
            cores: vec![],
            hottest: vec![],
            bpf_percent: 0.0,
            flamegraph: None,
            error: Some(why),
        };
        let all_failed = |why: String| {
            wanted
                .iter()
                .map(|(w, goals)| failed(*w, goals, why.clone()))
                .collect()
        };
        if wanted.is_empty() {
            return vec![];
        }
        if let Err(why) = profile::available() {
            return all_failed(why);
        }
        let run = || -> Result<Vec<Profile>> {
            let _listener = self.listener()?;
            let start = Instant::now();
            let k = self.connect(ktctl)?;
            with_output(&k, || {
                self.ready(start, &mut Values::new())?;
                // The shadow of an earlier repeat may still be terminating: wait until only
                // the new one is there.
                let shadow = loop {
                    let pods = pod_count(&self.tb, SHADOW)?;
                    if pods == 1 {
                        break pod_pids(&self.tb, SHADOW).unwrap_or_default();
                    }
                    if start.elapsed() > Duration::from_secs(90) {
                        bail!("{pods} pods match {SHADOW} 90 s after ktctl started");
                    }
                    std::thread::sleep(Duration::from_millis(500));
                };
                let mut pids = vec![k.pid()];
                pids.extend(shadow);
                Ok(wanted
                    .iter()
                    .map(|(w, goals)| {
                        eprintln!("bench: profiling the {} workload", w.name());
                        self.profile(*w, goals, &pids, dir)
                            .unwrap_or_else(|e| failed(*w, goals, format!("{e:#}")))
                    })
                    .collect())
            })
        };
        run().unwrap_or_else(|e| all_failed(format!("{e:#}")))
    }

    /// One workload's profile (its failure is the profile's error, not the benchmark's).
    fn profile(
        &self,
        w: Workload,
        goals: &[String],
        pids: &[u32],
        dir: &std::path::Path,
    ) -> Result<Profile> {
        let data = dir.join(format!("profile-{}.data", w.name()));
        let (before, started);
        match w.load(&format!("http://{}", self.ip)) {
            Some(load) => {
                let _load = Group::start(&self.tb, &load)?;
                std::thread::sleep(Duration::from_secs(1));
                (before, started) = (profile::cpu_times(), Instant::now());
                self.record(&data, pids, &[])?;
            }
            None => {
                let tool = self.connect_rate_args(self.sizes.conn_rate_n * HOOKS_PROFILE_RUNS)?;
                (before, started) = (profile::cpu_times(), Instant::now());
                self.record(&data, &[], &tool)?;
            }
        }
        let cores = profile::cores_by_process(&before, &profile::cpu_times(), started.elapsed());
        let folded = profile::take_folded(&data)?;
        let name = format!("profile-{}", w.name());
        std::fs::write(dir.join(format!("{name}.folded")), &folded)?;
        let title = match w {
            Workload::Hooks => "connect() to loopback with ktctl's hooks attached".to_string(),
            _ => format!("ktctl and its shadow: {} workload", w.name()),
        };
        std::fs::write(
            dir.join(format!("{name}.svg")),
            profile::flamegraph(&folded, &title)?,
        )?;
        Ok(Profile {
            workload: w,
            goals: goals.to_vec(),
            cores,
            hottest: profile::hottest(&folded, 10),
            bpf_percent: profile::bpf_percent(&folded),
            flamegraph: Some(format!("{name}.svg")),
            error: None,
        })
    }

    fn kt_connect(&self, k: &ktconnect::KtConnect, values: &mut Values) -> Result<()> {
        let start = Instant::now();
        let (running, _) = ktconnect::start(&self.tb, k, &self.node_selector())?;
        with_output(running.proc(), || {
            self.ready(start, values)?;
            self.client(running.proc().pid(), ktconnect::SHADOW_SELECTOR, values)
        })
    }

    fn node_selector(&self) -> String {
        format!("kubernetes.io/hostname={}", self.node)
    }

    /// Waits for the first request a client (ktctl, kt-connect) started at `start` carries to
    /// the pod IP: its time to ready, the shadow's start included.
    fn ready(&self, start: Instant, values: &mut Values) -> Result<()> {
        let url = format!("http://{}/1k", self.ip);
        while machine::output(
            &self.tb.layout,
            Machine::Laptop,
            &["curl", "-s", "-o", "/dev/null", "-m", "2", &url],
        )?
        .status
        .code()
            != Some(0)
        {
            if start.elapsed() > Duration::from_secs(60) {
                bail!("no request was carried within 60 s of the start");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        push(
            values,
            "time_to_ready_s",
            Some(start.elapsed().as_secs_f64()),
        );
        Ok(())
    }

    /// The measurements of a ready client: memory with idle connections, the load, memory
    /// after it, and its shadow's.
    fn client(&self, pid: u32, shadow: &str, values: &mut Values) -> Result<()> {
        let (hold, _) = bg(
            &self.tb,
            &self.xtask,
            &[
                "bench-tool",
                "hold",
                &format!("{}:80", self.ip),
                &self.sizes.idle_conns.to_string(),
            ],
            "ready",
            Duration::from_secs(60),
        )?;
        push(
            values,
            "rss_client_idle_1000_mib",
            status_mib(pid, "VmRSS:"),
        );
        drop(hold);
        measure_path(
            &self.tb,
            &Origin::Laptop,
            &format!("http://{}", self.ip),
            None,
            &self.sizes,
            values,
        )?;
        push(values, "rss_client_bulk_mib", status_mib(pid, "VmHWM:"));
        push(values, "rss_shadow_mib", pod_hwm_mib(&self.tb, shadow));
        Ok(())
    }
}

pub fn run(args: Args) -> Result<()> {
    let sizes = if args.quick {
        Sizes {
            secs: 2,
            bulk_mib: 32,
            idle_conns: 1000,
            conn_rate_n: 4000,
            pinned_runs: 2,
            router_cycles: 1,
        }
    } else {
        Sizes {
            secs: 8,
            bulk_mib: 256,
            idle_conns: 1000,
            conn_rate_n: 20000,
            pinned_runs: 3,
            router_cycles: 3,
        }
    };
    let repeats = if args.quick { 1 } else { args.repeats.max(1) };
    // The quick run is a smoke test of the harness: it reuses the debug build CI already made.
    let bin_dir = crate::build::binaries(!args.quick)?;
    let tb = Testbed::default();
    tb.up(UpOptions {
        nodes: tb.nodes().max(1),
    })?;
    let nginx = fixtures(&tb, sizes.bulk_mib)?;
    // Thousands of short connections a second from one client: let TIME_WAIT ports be reused
    // (in the testbed's laptop only), or the port range, not the path, sets the rate.
    let tw = sh(&tb, "cat /proc/sys/net/ipv4/tcp_tw_reuse")?
        .trim()
        .to_string();
    sh(&tb, "echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse")?;
    let _restore_tw = Restore(
        tb.clone(),
        format!("echo {tw} > /proc/sys/net/ipv4/tcp_tw_reuse"),
    );
    let bench = Bench {
        tb: tb.clone(),
        sizes,
        pod: nginx.pod,
        ip: nginx.ip,
        node: nginx.node,
        service_ip: nginx.service_ip,
        xtask: std::env::current_exe()?,
    };
    let mut raw: BTreeMap<String, Values> = BTreeMap::new();
    let mut clients = BTreeMap::new();
    let mut unavailable = BTreeMap::new();
    clients.insert(
        "ktctl".to_string(),
        format!(
            "ktctl {} ({} build), `ktctl connect`; both shadows run on the nginx pod's node (`--nodeSelector`)",
            env!("CARGO_PKG_VERSION"),
            if args.quick { "debug" } else { "release" }
        ),
    );
    clients.insert(
        "ktctl-forward".to_string(),
        "`ktctl forward pod/bench-pipe` (the API server's websocket port-forward, no tunnel) to a pod on the nginx pod's node that discards what it gets on one port and sends zeros on another; one stream each way".to_string(),
    );
    let mut kt_connect_failures = vec![];
    let kt_connect = match ktconnect::locate(args.kt_connect.as_deref()) {
        Ok(k) => {
            clients.insert(
                "kt-connect".to_string(),
                format!(
                    "kt-connect {} (`ktctl connect --mode tun2socks`), shadow image {} as the testbed runs it (sshd and CoreDNS of this machine)",
                    k.version,
                    ktconnect::SHADOW_IMAGE
                ),
            );
            Some(k)
        }
        Err(why) => {
            unavailable.insert("kt-connect".to_string(), why);
            None
        }
    };
    let ktctl = bin_dir.join("ktctl");
    let inbound_start = Instant::now();
    let mut inbound = inbound::Inbound::start(&bench)?;
    let mut inbound_time = inbound_start.elapsed();
    for r in 0..repeats {
        eprintln!("bench: repeat {}/{repeats}: raw", r + 1);
        settle::settle(&tb, "raw")?;
        bench.raw(raw.entry("raw".into()).or_default())?;
        eprintln!("bench: repeat {}/{repeats}: kubectl port-forward", r + 1);
        settle::settle(&tb, "kubectl port-forward")?;
        bench.port_forward(raw.entry("port-forward".into()).or_default())?;
        eprintln!("bench: repeat {}/{repeats}: ktctl", r + 1);
        settle::settle(&tb, "ktctl")?;
        bench.ktctl(&ktctl, raw.entry("ktctl".into()).or_default())?;
        eprintln!(
            "bench: repeat {}/{repeats}: ktctl forward (the port-forward by direction)",
            r + 1
        );
        settle::settle(&tb, "ktctl forward")?;
        forward::measure(
            &bench,
            &ktctl,
            raw.entry("ktctl-forward".into()).or_default(),
        )?;
        if let Some(k) = &kt_connect {
            eprintln!("bench: repeat {}/{repeats}: kt-connect", r + 1);
            settle::settle(&tb, "kt-connect")?;
            let mut values = Values::new();
            match bench.kt_connect(k, &mut values) {
                Ok(()) => {
                    let all = raw.entry("kt-connect".into()).or_default();
                    for (m, v) in values {
                        all.entry(m).or_default().extend(v);
                    }
                }
                // kt-connect failing is a result about kt-connect, not a failed benchmark:
                // the report says so, with kt-connect's own last words.
                Err(e) => {
                    eprintln!("bench: kt-connect failed in repeat {}: {e:#}", r + 1);
                    kt_connect_failures.push(format!("repeat {}: {e:#}", r + 1));
                }
            }
        }
        let repeat = format!("repeat {}/{repeats}", r + 1);
        let start = Instant::now();
        inbound.measure(&bench, &ktctl, &mut raw, &repeat)?;
        inbound_time += start.elapsed();
    }
    clients.extend(inbound.describe());
    drop(inbound);
    eprintln!(
        "bench: the inbound paths took {:.0} s",
        inbound_time.as_secs_f64()
    );
    let mut notes = vec![];
    if !kt_connect_failures.is_empty() {
        let what = format!(
            "kt-connect failed in {} of {repeats} repeat(s):\n```\n{}\n```",
            kt_connect_failures.len(),
            kt_connect_failures.join("\n")
        );
        if raw.contains_key("kt-connect") {
            notes.push(format!(
                "{what}\nIts numbers are those of the other repeats."
            ));
        } else {
            unavailable.insert("kt-connect".to_string(), what);
        }
    }
    let mut report = Report::new(raw, clients, unavailable, notes, args.quick, repeats);
    let dir = tb.layout.target.join("bench");
    std::fs::create_dir_all(&dir)?;
    let mut wanted: BTreeMap<Workload, Vec<String>> = BTreeMap::new();
    for g in &report.goals {
        if let Some(w) = g.workload
            && (args.profile == Profiles::All || g.met == Some(false))
        {
            wanted.entry(w).or_default().push(g.goal.to_string());
        }
    }
    if args.profile == Profiles::None {
        wanted.clear();
    } else if args.quick {
        // A smoke run: one workload, so that profiling keeps working.
        let first = wanted.pop_first();
        wanted = BTreeMap::from([first.unwrap_or((
            Workload::Latency,
            vec!["none missed: the quick run profiles one workload".to_string()],
        ))]);
    }
    report.profiles = bench.profiles(&ktctl, wanted, &dir);
    std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(&report)?)?;
    let md = report::markdown(&report);
    let svg = report::svg(&report);
    std::fs::write(dir.join("report.md"), &md)?;
    std::fs::write(dir.join("report.svg"), &svg)?;
    println!("{md}");
    eprintln!("bench: {} (json, md, svg)", dir.display());
    if args.readme && !args.quick {
        report::update_readme(&md, &svg)?;
    }
    Ok(())
}
