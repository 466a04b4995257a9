//! `cargo xtask bench`: every path to the same nginx pod measured side by side in one run on
//! the testbed, with ratios to the baselines of that run. Numbers are reported, never asserted.
//!
//! Paths: `raw` (the laptop given a temporary route to the pod network: the testbed's limit),
//! `port-forward` (kubectl port-forward to the pod), `kt-connect` (alibaba/kt-connect's
//! `ktctl connect`, when a binary of it is given; else the report says why not), `ktctl`
//! (ktctl connect, to the pod IP).
//!
//! Layout: this file runs the paths; [`report`] makes the table, goals and plot; [`ktconnect`]
//! runs kt-connect without letting it touch this machine; [`tool`] holds the small clients
//! the benchmark runs inside the testbed.

mod ktconnect;
mod profile;
mod report;
pub mod tool;

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kt_testbed::{Machine, Testbed, UpOptions, machine};

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
    /// why kt-connect is not measured
    #[arg(long, env = "KT_CONNECT_BIN")]
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

/// Raw values of one path: metric -> one value per repeat.
type Values = BTreeMap<String, Vec<f64>>;

fn push(values: &mut Values, metric: &str, v: Option<f64>) {
    if let Some(v) = v {
        values.entry(metric.to_string()).or_default().push(v);
    }
}

pub(crate) fn laptop(tb: &Testbed, args: &[&str]) -> Result<String> {
    let o = machine::output(&tb.layout, Machine::Laptop, args)?;
    if !o.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn sh(tb: &Testbed, line: &str) -> Result<String> {
    laptop(tb, &["sh", "-c", line])
}

/// Parses wrk's --latency distribution: the value at `pct` ("50%") in milliseconds.
fn wrk_percentile(out: &str, pct: &str) -> Option<f64> {
    let line = out.lines().find(|l| l.trim_start().starts_with(pct))?;
    let v = line.split_whitespace().nth(1)?;
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

fn wrk_rate(out: &str) -> Option<f64> {
    out.lines()
        .find(|l| l.starts_with("Requests/sec:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

struct Sizes {
    secs: u32,
    bulk_mib: u32,
    idle_conns: usize,
    conn_rate_n: usize,
}

fn measure_path(tb: &Testbed, base: &str, s: &Sizes, results: &mut Values) -> Result<()> {
    let d = format!("{}s", s.secs);
    let mut push = |k: &str, v: Option<f64>| push(results, k, v);
    let ka = sh(tb, &format!("wrk -t1 -c1 -d{d} --latency {base}/1k"))?;
    push("latency_keepalive_p50_ms", wrk_percentile(&ka, "50%"));
    push("latency_keepalive_p99_ms", wrk_percentile(&ka, "99%"));
    let nc = sh(
        tb,
        &format!("wrk -t1 -c1 -d{d} --latency -H 'Connection: close' {base}/1k"),
    )?;
    push("latency_newconn_p50_ms", wrk_percentile(&nc, "50%"));
    push("latency_newconn_p99_ms", wrk_percentile(&nc, "99%"));
    let one = sh(
        tb,
        &format!("curl -sS -o /dev/null -m 300 -w '%{{speed_download}}' {base}/bulk"),
    )?;
    push(
        "bulk_1_stream_mib_s",
        one.trim().parse::<f64>().ok().map(|b| b / 1048576.0),
    );
    let start = Instant::now();
    sh(
        tb,
        &format!("seq 8 | xargs -P 8 -I{{}} curl -sS -o /dev/null -m 600 {base}/bulk"),
    )?;
    push(
        "bulk_8_streams_mib_s",
        Some(8.0 * f64::from(s.bulk_mib) / start.elapsed().as_secs_f64()),
    );
    // Four bulk downloads in a loop (a process group of ours, ended by its id) while small
    // requests are timed.
    let bulk = Group::start(
        tb,
        &format!(
            "for i in 1 2 3 4; do (while :; do curl -sS -o /dev/null -m 600 {base}/bulk || exit; done) & done; wait"
        ),
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let fair = sh(tb, &format!("wrk -t1 -c1 -d{d} --latency {base}/1k"));
    drop(bulk);
    push("fairness_p99_under_bulk_ms", wrk_percentile(&fair?, "99%"));
    let conns = sh(
        tb,
        &format!("wrk -t2 -c16 -d{d} -H 'Connection: close' {base}/1k"),
    )?;
    push("new_connections_per_s", wrk_rate(&conns));
    Ok(())
}

/// Creates the benchmark's nginx with a 1 KiB page and a bulk file; returns its pod's name,
/// IP and node.
fn fixtures(tb: &Testbed, bulk_mib: u32) -> Result<(String, String, String)> {
    let have = machine::output(
        &tb.layout,
        Machine::Laptop,
        &["kubectl", "get", "deploy/bench-nginx"],
    )?
    .status
    .success();
    if !have {
        laptop(
            tb,
            &[
                "kubectl",
                "create",
                "deployment",
                "bench-nginx",
                "--image=nginx:alpine",
                "--port=80",
            ],
        )?;
    }
    laptop(
        tb,
        &[
            "kubectl",
            "rollout",
            "status",
            "deploy/bench-nginx",
            "--timeout=90s",
        ],
    )?;
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
                "head -c 1024 /dev/zero | tr '\\0' k > /usr/share/nginx/html/1k; head -c {}M /dev/urandom > /usr/share/nginx/html/bulk",
                bulk_mib
            ),
        ],
    )?;
    Ok((pod, ip, node))
}

/// A shell line run in the laptop as a process group of its own; the whole group is killed
/// (by its id) when dropped.
struct Group(Child);

impl Group {
    fn start(tb: &Testbed, line: &str) -> Result<Group> {
        use std::os::unix::process::CommandExt;
        let mut cmd = machine::command(&tb.layout, Machine::Laptop, "sh")?;
        cmd.args(["-c", line])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        Ok(Group(cmd.spawn().context("starting a background group")?))
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group this process created.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// Runs a shell line in the laptop when dropped (undoes a setting).
struct Restore(Testbed, String);

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = sh(&self.0, &self.1);
    }
}

/// A process started in the laptop, stopped (SIGINT, then SIGKILL) when dropped; keeps the
/// last lines of its output for error messages.
pub(crate) struct Bg {
    child: Child,
    output: Arc<Mutex<VecDeque<String>>>,
}

/// Lines of a background process's output kept for its error messages.
const OUTPUT_LINES: usize = 40;

impl Bg {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines it printed.
    pub(crate) fn output(&self) -> String {
        let lines = self.output.lock().expect("output lock");
        lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        // SAFETY: kill(2) on a child this process started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "bench: pid {} did not end within 20 s of SIGINT; killing it",
            self.child.id()
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `program` in the laptop and waits until a line of its output contains `ready`.
pub(crate) fn bg(
    tb: &Testbed,
    program: &std::path::Path,
    args: &[&str],
    ready: &str,
    timeout: Duration,
) -> Result<(Bg, Duration)> {
    let start = Instant::now();
    let mut cmd = machine::command(&tb.layout, Machine::Laptop, program)?;
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let output = Arc::new(Mutex::new(VecDeque::with_capacity(OUTPUT_LINES)));
    for s in [
        Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().expect("stderr")),
    ] {
        let (tx, output) = (tx.clone(), output.clone());
        std::thread::spawn(move || {
            for l in BufReader::new(s).lines().map_while(Result::ok) {
                {
                    let mut o = output.lock().expect("output lock");
                    if o.len() == OUTPUT_LINES {
                        o.pop_front();
                    }
                    o.push_back(l.clone());
                }
                let _ = tx.send(l);
            }
        });
    }
    drop(tx);
    let child = Bg { child, output };
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) if l.contains(ready) => return Ok((child, start.elapsed())),
            Ok(_) => {}
            // Both output pipes closed: it has ended.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => bail!(
                "{} ended before printing {ready:?}; its output:\n{}",
                program.display(),
                child.output()
            ),
            Err(_) if start.elapsed() > timeout => bail!(
                "{} did not print {ready:?} in {timeout:?}; its output:\n{}",
                program.display(),
                child.output()
            ),
            Err(_) => {}
        }
    }
}

/// Runs `f`; a failure gets the last lines of `proc`'s output.
fn with_output<T>(proc: &Bg, f: impl FnOnce() -> Result<T>) -> Result<T> {
    f().map_err(|e| e.context(format!("its output ended with:\n{}", proc.output())))
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
            &format!("http://{}", self.ip),
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
        measure_path(&self.tb, "http://127.0.0.1:18090", &self.sizes, values)
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
            &format!("http://{}", self.ip),
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
        }
    } else {
        Sizes {
            secs: 8,
            bulk_mib: 256,
            idle_conns: 1000,
            conn_rate_n: 20000,
        }
    };
    let repeats = if args.quick { 1 } else { args.repeats.max(1) };
    // The quick run is a smoke test of the harness: it reuses the debug build CI already made.
    let bin_dir = crate::build::binaries(!args.quick)?;
    let tb = Testbed::default();
    tb.up(UpOptions {
        nodes: tb.nodes().max(1),
    })?;
    let (pod, ip, node) = fixtures(&tb, sizes.bulk_mib)?;
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
        pod,
        ip,
        node,
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
    for r in 0..repeats {
        eprintln!("bench: repeat {}/{repeats}: raw", r + 1);
        bench.raw(raw.entry("raw".into()).or_default())?;
        eprintln!("bench: repeat {}/{repeats}: kubectl port-forward", r + 1);
        bench.port_forward(raw.entry("port-forward".into()).or_default())?;
        eprintln!("bench: repeat {}/{repeats}: ktctl", r + 1);
        bench.ktctl(&ktctl, raw.entry("ktctl".into()).or_default())?;
        if let Some(k) = &kt_connect {
            eprintln!("bench: repeat {}/{repeats}: kt-connect", r + 1);
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
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 2s test @ http://10.244.1.5/1k\n  1 threads and 1 connections\n  Latency Distribution\n     50%  180.00us\n     75%  210.00us\n     90%    1.20ms\n     99%    2.50ms\n  5000 requests in 2.00s, 6.00MB read\nRequests/sec:   2500.50\nTransfer/sec:      3.00MB\n";

    #[test]
    fn wrk_output_parses() {
        assert_eq!(wrk_percentile(WRK, "50%"), Some(0.18));
        assert_eq!(wrk_percentile(WRK, "99%"), Some(2.5));
        assert_eq!(wrk_percentile(WRK, "42%"), None);
        assert_eq!(wrk_rate(WRK), Some(2500.5));
    }
}
