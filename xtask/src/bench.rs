//! `cargo xtask bench`: every path to the same nginx pod measured side by side in one run on
//! the testbed, with ratios to the baselines of that run. Numbers are reported, never asserted.
//!
//! Paths: `raw` (the laptop given a temporary route to the pod network: the testbed's limit),
//! `port-forward` (kubectl port-forward to the pod), `ktctl` (ktctl connect, to the pod IP),
//! `kt-connect` (reported as unavailable with the reason when it cannot be built here).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kt_testbed::{Machine, Testbed, UpOptions, machine};
use serde::Serialize;

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
}

impl Args {
    pub fn quick() -> Args {
        Args {
            quick: true,
            repeats: 1,
            readme: false,
        }
    }
}

/// Helpers run inside the laptop by the benchmark (hidden from `--help`).
#[derive(clap::Subcommand, Debug)]
pub enum Tool {
    /// Accept and close connections on ADDR
    Listen { addr: SocketAddr },
    /// Open and close N connections to ADDR from T threads; print connections per second
    ConnectRate {
        addr: SocketAddr,
        n: usize,
        threads: usize,
    },
    /// Open N idle connections to ADDR, print "ready", hold them until stdin closes
    Hold { addr: SocketAddr, n: usize },
}

pub fn tool(t: Tool) -> Result<()> {
    match t {
        Tool::Listen { addr } => {
            // A deep backlog: SYNs dropped on a full queue wait a second to retry, which would
            // measure the listener instead of connect().
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.bind(&addr.into())?;
            s.listen(4096)?;
            let l: TcpListener = s.into();
            println!("listening");
            std::io::stdout().flush()?;
            let threads: Vec<_> = (0..2)
                .map(|_| {
                    let l = l.try_clone().expect("listener clone");
                    std::thread::spawn(move || {
                        for c in l.incoming() {
                            drop(c);
                        }
                    })
                })
                .collect();
            for t in threads {
                let _ = t.join();
            }
        }
        Tool::ConnectRate { addr, n, threads } => {
            let start = Instant::now();
            let per = n / threads;
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    std::thread::spawn(move || {
                        for _ in 0..per {
                            // Close with RST: no TIME_WAIT, so the port range never runs out.
                            if let Ok(s) = TcpStream::connect(addr) {
                                let off = libc::linger {
                                    l_onoff: 1,
                                    l_linger: 0,
                                };
                                // SAFETY: setsockopt on our own socket with a valid struct.
                                unsafe {
                                    libc::setsockopt(
                                        std::os::fd::AsRawFd::as_raw_fd(&s),
                                        libc::SOL_SOCKET,
                                        libc::SO_LINGER,
                                        (&off as *const libc::linger).cast(),
                                        std::mem::size_of::<libc::linger>() as u32,
                                    )
                                };
                            }
                        }
                    })
                })
                .collect();
            for h in handles {
                let _ = h.join();
            }
            println!(
                "{:.1}",
                (per * threads) as f64 / start.elapsed().as_secs_f64()
            );
        }
        Tool::Hold { addr, n } => {
            let mut conns = Vec::with_capacity(n);
            for _ in 0..n {
                conns.push(TcpStream::connect(addr)?);
            }
            println!("ready");
            std::io::stdout().flush()?;
            let mut buf = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut buf);
        }
    }
    Ok(())
}

#[derive(Serialize, Default, Clone, Debug)]
struct Stat {
    min: f64,
    median: f64,
    max: f64,
}

fn stat(mut v: Vec<f64>) -> Option<Stat> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    Some(Stat {
        min: v[0],
        median: v[v.len() / 2],
        max: v[v.len() - 1],
    })
}

/// One path's results: metric name -> stats.
type PathResults = BTreeMap<String, Stat>;

/// A goal from the benchmark issue, read against this run.
#[derive(Serialize)]
struct Goal {
    goal: &'static str,
    value: Option<f64>,
    met: Option<bool>,
}

#[derive(Serialize)]
struct Report {
    date: String,
    machine: String,
    quick: bool,
    repeats: usize,
    paths: BTreeMap<String, PathResults>,
    unavailable: BTreeMap<String, String>,
    ratios: BTreeMap<String, f64>,
    goals: Vec<Goal>,
}

fn goals(paths: &BTreeMap<String, PathResults>) -> Vec<Goal> {
    let med = |p: &str, m: &str| paths.get(p).and_then(|x| x.get(m)).map(|s| s.median);
    let ratio = |m: &str| Some(med("ktctl", m)? / med("port-forward", m)?);
    let check = |goal: &'static str, value: Option<f64>, ok: fn(f64) -> bool| Goal {
        goal,
        value,
        met: value.map(ok),
    };
    vec![
        check(
            "small-request p50 <= 1.1x kubectl port-forward's",
            ratio("latency_keepalive_p50_ms"),
            |v| v <= 1.1,
        ),
        check(
            "bulk throughput (1 stream) >= 1x kubectl port-forward's",
            ratio("bulk_1_stream_mib_s"),
            |v| v >= 1.0,
        ),
        check(
            "fairness: small-request p99 under 4 bulk streams <= 2x idle p99",
            med("ktctl", "fairness_p99_under_bulk_ms")
                .zip(med("ktctl", "latency_keepalive_p99_ms"))
                .map(|(a, b)| a / b),
            |v| v <= 2.0,
        ),
        check(
            "new connections/s >= 5x kubectl port-forward's",
            ratio("new_connections_per_s"),
            |v| v >= 5.0,
        ),
        check(
            "ktctl RSS <= 60 MiB at 1,000 connections (MiB)",
            med("ktctl", "rss_ktctl_idle_1000_mib"),
            |v| v <= 60.0,
        ),
        check(
            "hooks cost <= 2% of other traffic's connect() rate (with/without)",
            med("ktctl", "hooks_connect_rate_ratio"),
            |v| v >= 0.98,
        ),
    ]
}

/// Metric names, units and whether bigger is better.
const METRICS: &[(&str, &str, bool)] = &[
    ("latency_keepalive_p50_ms", "ms", false),
    ("latency_keepalive_p99_ms", "ms", false),
    ("latency_newconn_p50_ms", "ms", false),
    ("latency_newconn_p99_ms", "ms", false),
    ("bulk_1_stream_mib_s", "MiB/s", true),
    ("bulk_8_streams_mib_s", "MiB/s", true),
    ("fairness_p99_under_bulk_ms", "ms", false),
    ("new_connections_per_s", "conn/s", true),
    ("time_to_ready_s", "s", false),
    ("rss_ktctl_idle_1000_mib", "MiB", false),
    ("rss_ktctl_bulk_mib", "MiB", false),
    ("rss_shadow_mib", "MiB", false),
    ("hooks_connect_rate_ratio", "x", true),
];

fn laptop(tb: &Testbed, args: &[&str]) -> Result<String> {
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

fn measure_path(
    tb: &Testbed,
    base: &str,
    s: &Sizes,
    results: &mut BTreeMap<String, Vec<f64>>,
) -> Result<()> {
    let d = format!("{}s", s.secs);
    let mut push = |k: &str, v: Option<f64>| {
        if let Some(v) = v {
            results.entry(k.to_string()).or_default().push(v);
        }
    };
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

/// Creates the benchmark's nginx with a 1 KiB page and a bulk file.
fn fixtures(tb: &Testbed, bulk_mib: u32) -> Result<(String, String)> {
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
    let pod = laptop(
        tb,
        &[
            "kubectl",
            "get",
            "pod",
            "-l",
            "app=bench-nginx",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ],
    )?
    .trim()
    .to_string();
    let ip = laptop(
        tb,
        &[
            "kubectl",
            "get",
            "pod",
            &pod,
            "-o",
            "jsonpath={.status.podIP}",
        ],
    )?
    .trim()
    .to_string();
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
    Ok((pod, ip))
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

/// A process started in the laptop, killed when dropped.
struct Bg(Child);

impl Drop for Bg {
    fn drop(&mut self) {
        // SAFETY: kill(2) on a child this process started.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bg(
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
    for s in [
        Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().expect("stderr")),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(s).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
    }
    let child = Bg(child);
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) if l.contains(ready) => return Ok((child, start.elapsed())),
            Ok(_) => {}
            Err(_) if start.elapsed() > timeout => bail!(
                "{} did not print {ready:?} in {timeout:?}",
                program.display()
            ),
            Err(_) => {}
        }
    }
}

fn vm_hwm_mib(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn vm_rss_mib(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// The shadow's process: the kt-router in the pod's container cgroup on its node.
fn shadow_pid(tb: &Testbed) -> Option<u32> {
    let pod = laptop(
        tb,
        &[
            "kubectl",
            "get",
            "pod",
            "-l",
            "kt.dev/role=shadow-connect",
            "-o",
            "jsonpath={.items[0].metadata.uid} {.items[0].spec.nodeName}",
        ],
    )
    .ok()?;
    let mut it = pod.split_whitespace();
    let (uid, node) = (it.next()?, it.next()?);
    let cg = machine::cgroup(Machine::parse(node)?)
        .ok()?
        .join("pods")
        .join(uid)
        .join("shadow/cgroup.procs");
    std::fs::read_to_string(cg)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Why kt-connect is not measured, in the words of the tools that failed.
fn kt_connect_unavailable() -> String {
    let o = std::process::Command::new("go")
        .args(["list", "-m", "-versions", "github.com/alibaba/kt-connect"])
        .env("GOTOOLCHAIN", "local")
        .output();
    let detail = match o {
        Ok(o) => format!(
            "{} {}",
            String::from_utf8_lossy(&o.stdout).trim(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => e.to_string(),
    };
    format!(
        "`go list -m -versions github.com/alibaba/kt-connect` answered: {}; the Go module proxy these machines reach does not serve kt-connect v0.3.7, so it cannot be built here",
        detail.trim()
    )
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
    let (pod, ip) = fixtures(&tb, sizes.bulk_mib)?;
    let xtask = std::env::current_exe()?;
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
    let mut raw: BTreeMap<String, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    let mut unavailable = BTreeMap::new();
    unavailable.insert("kt-connect".to_string(), kt_connect_unavailable());

    for r in 0..repeats {
        eprintln!("bench: repeat {}/{repeats}", r + 1);
        // raw: a temporary route from the laptop to the pod network, removed right after.
        let route = format!(
            "ip route add {} via {} dev eth0 onlink",
            kt_testbed::layout::POD_CIDR,
            kt_testbed::layout::api_server_ip()
        );
        sh(&tb, &route)?;
        let res = measure_path(
            &tb,
            &format!("http://{ip}"),
            &sizes,
            raw.entry("raw".into()).or_default(),
        );
        sh(
            &tb,
            &format!("ip route del {}", kt_testbed::layout::POD_CIDR),
        )?;
        res?;

        // kubectl port-forward to the same pod.
        let kubectl = tb.layout.bin().join("kubectl");
        let (pf, _) = bg(
            &tb,
            &kubectl,
            &["port-forward", &format!("pod/{pod}"), "18090:80"],
            "Forwarding from",
            Duration::from_secs(30),
        )?;
        measure_path(
            &tb,
            "http://127.0.0.1:18090",
            &sizes,
            raw.entry("port-forward".into()).or_default(),
        )?;
        drop(pf);

        // What the hooks cost other traffic: connect() to a loopback server, best of three runs
        // without ktctl, then the same while ktctl's hooks are attached.
        let (listener, _) = bg(
            &tb,
            &xtask,
            &["bench-tool", "listen", "127.0.0.1:18099"],
            "listening",
            Duration::from_secs(10),
        )?;
        let rate = |tb: &Testbed| -> Result<f64> {
            let mut best = 0f64;
            for _ in 0..3 {
                let out = laptop(
                    tb,
                    &[
                        xtask.to_str().expect("utf-8"),
                        "bench-tool",
                        "connect-rate",
                        "127.0.0.1:18099",
                        &sizes.conn_rate_n.to_string(),
                        "2",
                    ],
                )?;
                best = best.max(out.trim().parse()?);
            }
            Ok(best)
        };
        let without = rate(&tb)?;

        // ktctl connect, to the pod IP; time to ready includes the shadow's start.
        let ktctl = bin_dir.join("ktctl");
        let start = Instant::now();
        let (k, _) = bg(
            &tb,
            &ktctl,
            &["connect"],
            "All looks good",
            Duration::from_secs(120),
        )?;
        while machine::output(
            &tb.layout,
            Machine::Laptop,
            &[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-m",
                "2",
                &format!("http://{ip}/1k"),
            ],
        )?
        .status
        .code()
            != Some(0)
        {
            if start.elapsed() > Duration::from_secs(60) {
                bail!("ktctl did not carry a request within 60 s of its banner");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let ready = start.elapsed().as_secs_f64();
        let m = raw.entry("ktctl".into()).or_default();
        m.entry("time_to_ready_s".into()).or_default().push(ready);
        let kpid = k.0.id();
        // Idle connections held open through ktctl.
        let (hold, _) = bg(
            &tb,
            &xtask,
            &[
                "bench-tool",
                "hold",
                &format!("{ip}:80"),
                &sizes.idle_conns.to_string(),
            ],
            "ready",
            Duration::from_secs(60),
        )?;
        if let Some(v) = vm_rss_mib(kpid) {
            m.entry("rss_ktctl_idle_1000_mib".into())
                .or_default()
                .push(v);
        }
        drop(hold);
        measure_path(&tb, &format!("http://{ip}"), &sizes, m)?;
        if let Some(v) = vm_hwm_mib(kpid) {
            m.entry("rss_ktctl_bulk_mib".into()).or_default().push(v);
        }
        if let Some(v) = shadow_pid(&tb).and_then(vm_hwm_mib) {
            m.entry("rss_shadow_mib".into()).or_default().push(v);
        }
        let with = rate(&tb)?;
        drop(k);
        drop(listener);
        m.entry("hooks_connect_rate_ratio".into())
            .or_default()
            .push(with / without);
    }

    let paths: BTreeMap<String, PathResults> = raw
        .into_iter()
        .map(|(p, ms)| {
            (
                p,
                ms.into_iter()
                    .filter_map(|(k, v)| stat(v).map(|s| (k, s)))
                    .collect(),
            )
        })
        .collect();
    let mut ratios = BTreeMap::new();
    let med = |p: &str, m: &str| paths.get(p).and_then(|x| x.get(m)).map(|s| s.median);
    for (m, _, _) in METRICS {
        for base in ["raw", "port-forward"] {
            if let (Some(k), Some(b)) = (med("ktctl", m), med(base, m))
                && b != 0.0
            {
                ratios.insert(format!("ktctl/{base} {m}"), k / b);
            }
        }
    }
    let goals = goals(&paths);
    let report = Report {
        goals,
        date: jiff_now(),
        machine: machine_description(),
        quick: args.quick,
        repeats,
        paths,
        unavailable,
        ratios,
    };
    let dir = tb.layout.target.join("bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(&report)?)?;
    let md = markdown(&report);
    std::fs::write(dir.join("report.md"), &md)?;
    std::fs::write(dir.join("report.svg"), svg(&report))?;
    println!("{md}");
    eprintln!("bench: {} (json, md, svg)", dir.display());
    if args.readme && !args.quick {
        update_readme(&md)?;
    }
    Ok(())
}

fn jiff_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {}", kernel.trim())
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn markdown(r: &Report) -> String {
    let mut s = format!(
        "Measured {} on {} ({}; median of {} run(s), min–max in brackets).\n\n| metric | raw | kubectl port-forward | ktctl | ktctl / port-forward | ktctl / raw |\n|---|---|---|---|---|---|\n",
        r.date,
        r.machine,
        if r.quick { "quick run" } else { "full run" },
        r.repeats
    );
    for (m, unit, _) in METRICS {
        let cell = |p: &str| {
            r.paths
                .get(p)
                .and_then(|x| x.get(*m))
                .map(|st| format!("{} [{}–{}]", fmt(st.median), fmt(st.min), fmt(st.max)))
                .unwrap_or_else(|| "–".into())
        };
        let ratio = |b: &str| {
            r.ratios
                .get(&format!("ktctl/{b} {m}"))
                .map(|v| format!("{v:.2}×"))
                .unwrap_or_else(|| "–".into())
        };
        s += &format!(
            "| {m} ({unit}) | {} | {} | {} | {} | {} |\n",
            cell("raw"),
            cell("port-forward"),
            cell("ktctl"),
            ratio("port-forward"),
            ratio("raw")
        );
    }
    s += "\n| goal | this run | |\n|---|---|---|\n";
    for g in &r.goals {
        let v = g
            .value
            .map(|v| format!("{v:.2}"))
            .unwrap_or_else(|| "–".into());
        let verdict = match g.met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "not measured",
        };
        s += &format!("| {} | {v} | {verdict} |\n", g.goal);
    }
    s += "\nGoals against kt-connect (p50 <= 0.5x, bulk >= 3x) need kt-connect, which is not measured:\n";
    for (p, why) in &r.unavailable {
        s += &format!("\n**{p}**: not measured. {why}\n");
    }
    s
}

/// Bars of the medians of the main metrics, one group per metric, one bar per path.
fn svg(r: &Report) -> String {
    let metrics = [
        "latency_keepalive_p50_ms",
        "latency_newconn_p50_ms",
        "fairness_p99_under_bulk_ms",
        "bulk_1_stream_mib_s",
        "bulk_8_streams_mib_s",
        "new_connections_per_s",
    ];
    let paths = ["raw", "port-forward", "ktctl"];
    let colors = ["#888888", "#d08c2c", "#2c7fb8"];
    let (w, h, group_h) = (760.0, 60.0 + 70.0 * metrics.len() as f64, 70.0);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="10" y="20" font-size="14">ktctl bench: {} ({})</text>"#,
        r.date, r.machine
    );
    for (i, (p, c)) in paths.iter().zip(colors).enumerate() {
        s += &format!(
            r#"<rect x="{}" y="32" width="12" height="12" fill="{c}"/><text x="{}" y="43">{p}</text>"#,
            10 + i * 130,
            26 + i * 130
        );
    }
    for (gi, m) in metrics.iter().enumerate() {
        let y0 = 60.0 + gi as f64 * group_h;
        s += &format!(r#"<text x="10" y="{}">{m}</text>"#, y0 + 12.0);
        let max = paths
            .iter()
            .filter_map(|p| r.paths.get(*p).and_then(|x| x.get(*m)).map(|st| st.median))
            .fold(0.0f64, f64::max);
        for (pi, (p, c)) in paths.iter().zip(colors).enumerate() {
            if let Some(v) = r.paths.get(*p).and_then(|x| x.get(*m)).map(|st| st.median) {
                let bw = if max > 0.0 { 520.0 * v / max } else { 0.0 };
                let y = y0 + 18.0 + pi as f64 * 15.0;
                s += &format!(
                    r#"<rect x="200" y="{y}" width="{bw:.1}" height="12" fill="{c}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                    205.0 + bw,
                    y + 10.0,
                    fmt(v)
                );
            }
        }
    }
    s + "</svg>\n"
}

fn update_readme(md: &str) -> Result<()> {
    let path = crate::build::workspace().join("README.md");
    let text = std::fs::read_to_string(&path)?;
    let (start, end) = ("<!-- bench:start -->", "<!-- bench:end -->");
    let (Some(a), Some(b)) = (text.find(start), text.find(end)) else {
        bail!("README.md has no {start}/{end} markers")
    };
    let new = format!(
        "{}{start}\n{md}\n![benchmark](docs/bench.svg)\n{}",
        &text[..a],
        &text[b..]
    );
    std::fs::write(&path, new)?;
    let svg = std::fs::read(crate::build::workspace().join("target/bench/report.svg"))?;
    std::fs::create_dir_all(crate::build::workspace().join("docs"))?;
    std::fs::write(crate::build::workspace().join("docs/bench.svg"), svg)?;
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

    #[test]
    fn stats_are_min_median_max() {
        let s = stat(vec![3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.min, s.median, s.max), (1.0, 2.0, 3.0));
        assert!(stat(vec![]).is_none());
        assert!(stat(vec![f64::NAN]).is_none());
    }
}
