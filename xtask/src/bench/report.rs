//! The benchmark's report: statistics over repeats, ratios to the baselines of the same run,
//! the goals of the benchmark issue, and the markdown, JSON and SVG outputs.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use serde::Serialize;

use super::profile::{self, Profile, Workload};

/// The paths, in the order of the table's columns: name in the JSON, heading, bar colour.
pub const PATHS: &[(&str, &str, &str)] = &[
    ("raw", "raw", "#888888"),
    ("port-forward", "kubectl port-forward", "#d08c2c"),
    ("kt-connect", "kt-connect", "#c0392b"),
    ("ktctl", "ktctl", "#2c7fb8"),
];

/// The inbound paths (from a client pod in the cluster), in the order of their table's
/// columns: name in the JSON, heading.
pub const INBOUND_PATHS: &[(&str, &str)] = &[
    ("cluster-service", "cluster → Service"),
    ("exchange", "cluster → exchanged Service → laptop"),
    ("mesh-no-header", "cluster → mesh router → pod"),
    ("mesh-header", "cluster → mesh router (header) → laptop"),
    ("cluster-service-router", "cluster → Service, router loaded"),
    (
        "cluster-service-router-active",
        "cluster → Service, router steering another",
    ),
    ("exchange-ebpf", "cluster → Service steered (ebpf) → laptop"),
    (
        "cluster-service-xdp",
        "cluster → Service, XDP_PASS on the veths",
    ),
];

/// The inbound ratios, as (path, divided by, heading): exchange against ktctl connect's
/// outbound figures (the tunnel's own cost, the other way), the router against what it stands
/// in front of.
const INBOUND_RATIOS: &[(&str, &str, &str)] = &[
    ("exchange", "ktctl", "exchange / ktctl connect (outbound)"),
    (
        "mesh-no-header",
        "cluster-service",
        "mesh (no header) / Service",
    ),
    ("mesh-header", "exchange", "mesh (header) / exchange"),
    (
        "cluster-service-router",
        "cluster-service",
        "Service with / without the router",
    ),
    (
        "cluster-service-router-active",
        "cluster-service",
        "Service with the router steering another / without",
    ),
    ("exchange-ebpf", "exchange", "exchange ebpf / selector"),
    (
        "cluster-service-xdp",
        "cluster-service",
        "Service with / without XDP_PASS",
    ),
];

/// The baselines ktctl is compared with, as (path, heading).
const BASELINES: &[(&str, &str)] = &[
    ("port-forward", "port-forward"),
    ("kt-connect", "kt-connect"),
    ("raw", "raw"),
];

/// Metric names and units.
pub const METRICS: &[(&str, &str)] = &[
    ("latency_keepalive_p50_ms", "ms"),
    ("latency_keepalive_p99_ms", "ms"),
    ("latency_newconn_p50_ms", "ms"),
    ("latency_newconn_p99_ms", "ms"),
    ("bulk_1_stream_mib_s", "MiB/s"),
    ("bulk_8_streams_mib_s", "MiB/s"),
    ("fairness_p99_under_bulk_ms", "ms"),
    ("new_connections_per_s", "conn/s"),
    ("time_to_ready_s", "s"),
    ("rss_client_idle_1000_mib", "MiB"),
    ("rss_client_bulk_mib", "MiB"),
    ("rss_shadow_mib", "MiB"),
    ("hooks_connect_rate_ratio", "x"),
    ("hooks_connect_cpu_ratio", "x"),
    ("hooks_bpf_cpu_percent", "%"),
    ("router_bpf_ns_per_request", "ns"),
    ("router_bpf_runs_per_request", "runs"),
    ("router_bpf_p50_percent", "%"),
    ("router_bpf_ns_per_run", "ns"),
    ("router_bpf_bulk_percent", "%"),
    ("pinned_keepalive_p50_us", "µs"),
    ("pinned_bulk_1_stream_mib_s", "MiB/s"),
    ("pinned_keepalive_p50_vs_without", "×"),
    ("pinned_bulk_1_stream_vs_without", "×"),
    ("upload_1_stream_mib_s", "MiB/s"),
    ("download_1_stream_mib_s", "MiB/s"),
];

#[derive(Serialize, Default, Clone, Debug, PartialEq)]
pub struct Stat {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

/// Min, median and max of the finite values; `None` when there are none. The median of an
/// even count is the mean of the middle two (of two repeats: their mean, not the larger one).
pub fn stat(mut v: Vec<f64>) -> Option<Stat> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let mid = v.len() / 2;
    let median = if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    };
    Some(Stat {
        min: v[0],
        median,
        max: v[v.len() - 1],
    })
}

/// One path's results: metric name -> stats.
pub type PathResults = BTreeMap<String, Stat>;

/// A goal from the benchmark issue, read against this run.
#[derive(Serialize, Debug)]
pub struct Goal {
    pub goal: &'static str,
    pub value: Option<f64>,
    pub met: Option<bool>,
    /// The workload whose profile explains a miss (none for memory, and for the inbound
    /// paths, which the profiles, of ktctl connect, do not cover).
    pub workload: Option<Workload>,
}

#[derive(Serialize)]
pub struct Report {
    pub date: String,
    pub machine: String,
    pub quick: bool,
    pub repeats: usize,
    /// What each measured client was (version, mode).
    pub clients: BTreeMap<String, String>,
    pub paths: BTreeMap<String, PathResults>,
    /// Every sample, path -> metric -> values in the order they were taken (the JSON's, for
    /// reading a run again).
    pub samples: BTreeMap<String, BTreeMap<String, Vec<f64>>>,
    /// Paths that were not measured, with the reason.
    pub unavailable: BTreeMap<String, String>,
    /// What else happened in the run (a path that failed in some repeats).
    pub notes: Vec<String>,
    pub ratios: BTreeMap<String, f64>,
    pub goals: Vec<Goal>,
    /// Where the time went in the workloads of missed goals.
    pub profiles: Vec<Profile>,
}

impl Report {
    /// Builds the report from every repeat's raw values (path -> metric -> values).
    pub fn new(
        raw: BTreeMap<String, BTreeMap<String, Vec<f64>>>,
        clients: BTreeMap<String, String>,
        unavailable: BTreeMap<String, String>,
        notes: Vec<String>,
        quick: bool,
        repeats: usize,
    ) -> Report {
        let bracketed: BTreeMap<String, f64> = BRACKETED
            .iter()
            .flat_map(|(p, base)| METRICS.iter().map(move |(m, _)| (*p, *base, *m)))
            .filter_map(|(p, base, m)| {
                Some((format!("{p}/{base} {m}"), bracketed(&raw, p, base, m)?))
            })
            .collect();
        let samples = raw.clone();
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
        for (m, _) in METRICS {
            for (base, _) in BASELINES {
                if let (Some(k), Some(b)) = (median(&paths, "ktctl", m), median(&paths, base, m))
                    && b != 0.0
                {
                    ratios.insert(format!("ktctl/{base} {m}"), k / b);
                }
            }
            for (p, base, _) in INBOUND_RATIOS {
                if let (Some(k), Some(b)) = (median(&paths, p, m), median(&paths, base, m))
                    && b != 0.0
                {
                    ratios.insert(format!("{p}/{base} {m}"), k / b);
                }
            }
        }
        // A path measured between two samples of its baseline is read against them.
        ratios.extend(bracketed);
        Report {
            goals: goals(&paths, &ratios),
            date: now(),
            machine: machine_description(),
            quick,
            repeats,
            clients,
            paths,
            samples,
            unavailable,
            notes,
            ratios,
            profiles: vec![],
        }
    }
}

/// Paths measured between two samples of their baseline in every repeat (the baseline before
/// and after the path's setup, the path once in between), as (path, baseline).
const BRACKETED: &[(&str, &str)] = &[("cluster-service-router", "cluster-service")];

/// `path` against the samples of `base` taken on both sides of it: the median over repeats of
/// path / mean(before, after). `base` holds two samples a repeat, in order, `path` one; `None`
/// when the counts do not fit (a run that did not bracket the path).
fn bracketed(
    raw: &BTreeMap<String, BTreeMap<String, Vec<f64>>>,
    path: &str,
    base: &str,
    metric: &str,
) -> Option<f64> {
    let p = raw.get(path)?.get(metric)?;
    let b = raw.get(base)?.get(metric)?;
    if p.is_empty() || b.len() != 2 * p.len() {
        return None;
    }
    let ratios = p
        .iter()
        .zip(b.chunks(2))
        .map(|(v, around)| v / ((around[0] + around[1]) / 2.0))
        .collect();
    stat(ratios).map(|s| s.median)
}

fn median(paths: &BTreeMap<String, PathResults>, path: &str, metric: &str) -> Option<f64> {
    paths.get(path)?.get(metric).map(|s| s.median)
}

/// Small-request p99 under four bulk streams over the idle p99, of one path.
fn fairness(paths: &BTreeMap<String, PathResults>, path: &str) -> Option<f64> {
    Some(
        median(paths, path, "fairness_p99_under_bulk_ms")?
            / median(paths, path, "latency_keepalive_p99_ms")?,
    )
}

pub fn goals(paths: &BTreeMap<String, PathResults>, ratios: &BTreeMap<String, f64>) -> Vec<Goal> {
    let ratio = |m: &str, base: &str| Some(median(paths, "ktctl", m)? / median(paths, base, m)?);
    // Exchange adds at most the tunnel's own cost: within 1.2x of ktctl connect's outbound
    // figures, through the same tunnel the other way.
    let exchange = |m: &str| Some(median(paths, "exchange", m)? / median(paths, "ktctl", m)?);
    let router_p50 = || {
        let m = "latency_keepalive_p50_ms";
        Some(median(paths, "mesh-no-header", m)? - median(paths, "cluster-service", m)?)
    };
    // The run's ratio (bracketed where the path was), else the medians'.
    let over = |p: &str, base: &str, m: &str| {
        ratios
            .get(&format!("{p}/{base} {m}"))
            .copied()
            .or_else(|| Some(median(paths, p, m)? / median(paths, base, m)?))
    };
    let check = |goal: &'static str, value: Option<f64>, ok: fn(f64) -> bool, w| Goal {
        goal,
        value,
        met: value.map(ok),
        workload: w,
    };
    vec![
        check(
            "small-request p50 <= 1.1x kubectl port-forward's",
            ratio("latency_keepalive_p50_ms", "port-forward"),
            |v| v <= 1.1,
            Some(Workload::Latency),
        ),
        check(
            "small-request p50 <= 0.5x kt-connect's",
            ratio("latency_keepalive_p50_ms", "kt-connect"),
            |v| v <= 0.5,
            Some(Workload::Latency),
        ),
        check(
            "bulk throughput (1 stream) >= 1x kubectl port-forward's",
            ratio("bulk_1_stream_mib_s", "port-forward"),
            |v| v >= 1.0,
            Some(Workload::Bulk),
        ),
        check(
            "bulk throughput (1 stream) >= 3x kt-connect's",
            ratio("bulk_1_stream_mib_s", "kt-connect"),
            |v| v >= 3.0,
            Some(Workload::Bulk),
        ),
        check(
            "fairness: small-request p99 under 4 bulk streams <= 2x idle p99",
            fairness(paths, "ktctl"),
            |v| v <= 2.0,
            Some(Workload::Fairness),
        ),
        check(
            "new connections/s >= 5x kubectl port-forward's",
            ratio("new_connections_per_s", "port-forward"),
            |v| v >= 5.0,
            Some(Workload::NewConnections),
        ),
        check(
            "ktctl RSS <= 60 MiB at 1,000 connections (MiB)",
            median(paths, "ktctl", "rss_client_idle_1000_mib"),
            |v| v <= 60.0,
            None,
        ),
        check(
            "hooks cost <= 2% of other traffic's connect(): % of its CPU time in the hooks (perf)",
            median(paths, "ktctl", "hooks_bpf_cpu_percent"),
            |v| v <= 2.0,
            Some(Workload::Hooks),
        ),
        check(
            "exchange: small-request p50 <= 1.2x ktctl connect's (outbound)",
            exchange("latency_keepalive_p50_ms"),
            |v| v <= 1.2,
            None,
        ),
        check(
            "exchange: small-request p99 <= 1.2x ktctl connect's (outbound)",
            exchange("latency_keepalive_p99_ms"),
            |v| v <= 1.2,
            None,
        ),
        check(
            "exchange: bulk throughput (1 stream) >= ktctl connect's (outbound) / 1.2",
            exchange("bulk_1_stream_mib_s"),
            |v| v >= 1.0 / 1.2,
            None,
        ),
        check(
            "exchange: new connections/s >= ktctl connect's (outbound) / 1.2",
            exchange("new_connections_per_s"),
            |v| v >= 1.0 / 1.2,
            None,
        ),
        check(
            "mesh router (no header) adds <= 0.2 ms to the in-cluster small-request p50 (ms)",
            router_p50(),
            |v| v <= 0.2,
            None,
        ),
        check(
            "router DaemonSet, traffic it does not steer: small-request p50 within 2% of without it (pinned, each reading against the two without the router around it)",
            median(
                paths,
                "cluster-service-router",
                "pinned_keepalive_p50_vs_without",
            ),
            |v| v <= 1.02,
            None,
        ),
        check(
            "router DaemonSet, traffic it does not steer: bulk throughput within 2% of without it (pinned, each reading against the two without the router around it)",
            median(
                paths,
                "cluster-service-router",
                "pinned_bulk_1_stream_vs_without",
            ),
            |v| v >= 0.98,
            None,
        ),
        check(
            "router DaemonSet steering another Service, traffic it does not steer: small-request p50 within 2% of without the router (pinned, as above)",
            median(
                paths,
                "cluster-service-router-active",
                "pinned_keepalive_p50_vs_without",
            ),
            |v| v <= 1.02,
            None,
        ),
        check(
            "router DaemonSet steering another Service, traffic it does not steer: bulk throughput within 2% of without the router (pinned, as above)",
            median(
                paths,
                "cluster-service-router-active",
                "pinned_bulk_1_stream_vs_without",
            ),
            |v| v >= 0.98,
            None,
        ),
        check(
            "router DaemonSet, traffic it does not steer: its programs' run time per small request <= 2% of the p50 (BPF run-time stats, %)",
            median(paths, "cluster-service-router", "router_bpf_p50_percent"),
            |v| v <= 2.0,
            None,
        ),
        check(
            "router DaemonSet, traffic it does not steer: its programs' run time <= 2% of a bulk download's (BPF run-time stats, %)",
            median(paths, "cluster-service-router", "router_bpf_bulk_percent"),
            |v| v <= 2.0,
            None,
        ),
        check(
            "exchange --mode ebpf: steered small-request p50 <= 1.1x selector mode's",
            over("exchange-ebpf", "exchange", "latency_keepalive_p50_ms"),
            |v| v <= 1.1,
            None,
        ),
    ]
}

fn now() -> String {
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

pub fn markdown(r: &Report) -> String {
    let mut s = format!(
        "Measured {} on {} ({}; median of {} run(s), min–max in brackets).\n\n",
        r.date,
        r.machine,
        if r.quick { "quick run" } else { "full run" },
        r.repeats
    );
    s += "| metric |";
    for (_, heading, _) in PATHS {
        s += &format!(" {heading} |");
    }
    for (_, heading) in BASELINES {
        s += &format!(" ktctl / {heading} |");
    }
    s += "\n|---|";
    s += &"---|".repeat(PATHS.len() + BASELINES.len());
    s += "\n";
    let measured = |paths: &[&str], m: &str| {
        paths
            .iter()
            .any(|p| r.paths.get(*p).is_some_and(|x| x.contains_key(m)))
    };
    let outbound: Vec<&str> = PATHS.iter().map(|p| p.0).collect();
    for (m, unit) in METRICS {
        // The inbound paths' own metrics (the router's) have their rows in the inbound table,
        // the port-forward's by direction a paragraph of their own.
        if !measured(&outbound, m) {
            continue;
        }
        s += &format!("| {m} ({unit}) |");
        for (p, _, _) in PATHS {
            s += &format!(" {} |", cell(r, p, m));
        }
        for (b, _) in BASELINES {
            let cell = r
                .ratios
                .get(&format!("ktctl/{b} {m}"))
                .map(|v| format!("{v:.2}×"))
                .unwrap_or_else(|| "–".into());
            s += &format!(" {cell} |");
        }
        s += "\n";
    }
    s += &inbound_table(r);
    s += &forward_paragraph(r);
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
    let others: Vec<String> = PATHS
        .iter()
        .filter(|(p, _, _)| *p != "ktctl")
        .filter_map(|(p, heading, _)| Some(format!("{heading} {:.1}×", fairness(&r.paths, p)?)))
        .collect();
    if !others.is_empty() {
        s += &format!(
            "\nThe same fairness ratio (p99 under bulk / idle p99) of the other paths in this run: {}.\n",
            others.join(", ")
        );
    }
    if !r.clients.is_empty() {
        s += "\n";
        for (p, what) in &r.clients {
            s += &format!("- {p}: {what}\n");
        }
    }
    for note in &r.notes {
        s += &format!("\n{note}\n");
    }
    for (p, why) in &r.unavailable {
        s += &format!("\n**{p}**: not measured. {why}\n");
    }
    s + &profile::markdown(&r.profiles)
}

/// The port-forward by direction, and exchange's bulk ratio with that asymmetry taken out;
/// empty when it was not measured.
fn forward_paragraph(r: &Report) -> String {
    let (Some(up), Some(down)) = (
        median(&r.paths, "ktctl-forward", "upload_1_stream_mib_s"),
        median(&r.paths, "ktctl-forward", "download_1_stream_mib_s"),
    ) else {
        return String::new();
    };
    let mut s = format!(
        "\nThe port-forward alone, by direction (`ktctl forward`, one stream, no tunnel): up (to the pod) {} MiB/s, down {} MiB/s: up / down {:.2}×.",
        cell(r, "ktctl-forward", "upload_1_stream_mib_s"),
        cell(r, "ktctl-forward", "download_1_stream_mib_s"),
        up / down
    );
    if let Some(w) = r.ratios.get("exchange/ktctl bulk_1_stream_mib_s") {
        s += &format!(
            " Exchange's downloads go up the port-forward and connect's come down it: exchange / connect bulk (1 stream) {w:.2}× is {:.2}× of the port-forward's own up / down.",
            w / (up / down)
        );
    }
    s + "\n"
}

/// The inbound paths' table, with their ratios; empty when none was measured.
fn inbound_table(r: &Report) -> String {
    let measured = |m: &str| {
        INBOUND_PATHS
            .iter()
            .any(|(p, _)| r.paths.get(*p).is_some_and(|x| x.contains_key(m)))
    };
    let rows: Vec<&(&str, &str)> = METRICS.iter().filter(|(m, _)| measured(m)).collect();
    if rows.is_empty() {
        return String::new();
    }
    let mut s = "\nInbound, from a client pod in the cluster (`ktctl exchange`, `ktctl mesh`):\n\n| metric |".to_string();
    for (_, heading) in INBOUND_PATHS {
        s += &format!(" {heading} |");
    }
    for (_, _, heading) in INBOUND_RATIOS {
        s += &format!(" {heading} |");
    }
    s += "\n|---|";
    s += &"---|".repeat(INBOUND_PATHS.len() + INBOUND_RATIOS.len());
    s += "\n";
    for (m, unit) in rows {
        s += &format!("| {m} ({unit}) |");
        for (p, _) in INBOUND_PATHS {
            s += &format!(" {} |", cell(r, p, m));
        }
        for (p, base, _) in INBOUND_RATIOS {
            let ratio = r
                .ratios
                .get(&format!("{p}/{base} {m}"))
                .map(|v| format!("{v:.2}×"))
                .unwrap_or_else(|| "–".into());
            s += &format!(" {ratio} |");
        }
        s += "\n";
    }
    s
}

/// A path's median of a metric, with min–max.
fn cell(r: &Report, path: &str, metric: &str) -> String {
    r.paths
        .get(path)
        .and_then(|x| x.get(metric))
        .map(|st| format!("{} [{}–{}]", fmt(st.median), fmt(st.min), fmt(st.max)))
        .unwrap_or_else(|| "–".into())
}

/// Bars of the medians of the main metrics, one group per metric, one bar per path.
pub fn svg(r: &Report) -> String {
    let metrics = [
        (
            "latency_keepalive_p50_ms",
            "small request p50 (ms, lower is better)",
        ),
        (
            "latency_newconn_p50_ms",
            "new connection + request p50 (ms, lower is better)",
        ),
        (
            "fairness_p99_under_bulk_ms",
            "small request p99 under bulk (ms, lower is better)",
        ),
        (
            "bulk_1_stream_mib_s",
            "bulk, 1 stream (MiB/s, higher is better)",
        ),
        (
            "bulk_8_streams_mib_s",
            "bulk, 8 streams (MiB/s, higher is better)",
        ),
        (
            "new_connections_per_s",
            "new connections/s (higher is better)",
        ),
    ];
    let group_h = 20.0 + 15.0 * PATHS.len() as f64;
    let (w, h) = (760.0, 60.0 + group_h * metrics.len() as f64);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="10" y="20" font-size="14">ktctl bench: {} ({})</text>"#,
        r.date, r.machine
    );
    for (i, (_, heading, c)) in PATHS.iter().enumerate() {
        s += &format!(
            r#"<rect x="{}" y="32" width="12" height="12" fill="{c}"/><text x="{}" y="43">{heading}</text>"#,
            10 + i * 170,
            26 + i * 170
        );
    }
    for (gi, (m, title)) in metrics.iter().enumerate() {
        let y0 = 60.0 + gi as f64 * group_h;
        s += &format!(r#"<text x="10" y="{}">{title}</text>"#, y0 + 12.0);
        let value = |p: &str| r.paths.get(p).and_then(|x| x.get(*m)).map(|st| st.median);
        let max = PATHS
            .iter()
            .filter_map(|(p, _, _)| value(p))
            .fold(0.0f64, f64::max);
        for (pi, (p, heading, c)) in PATHS.iter().enumerate() {
            let y = y0 + 18.0 + pi as f64 * 15.0;
            match value(p) {
                Some(v) => {
                    let bw = if max > 0.0 { 480.0 * v / max } else { 0.0 };
                    s += &format!(
                        r#"<rect x="200" y="{y}" width="{bw:.1}" height="12" fill="{c}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                        205.0 + bw,
                        y + 10.0,
                        fmt(v)
                    );
                }
                None => {
                    s += &format!(
                        r##"<text x="205" y="{:.1}" fill="#999999">{heading}: not measured</text>"##,
                        y + 10.0
                    );
                }
            }
        }
    }
    s + "</svg>\n"
}

/// Writes the table between the README's bench markers and the plot to docs/bench.svg.
pub fn update_readme(md: &str, svg: &str) -> Result<()> {
    let ws = crate::build::workspace();
    let path = ws.join("README.md");
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
    std::fs::create_dir_all(ws.join("docs"))?;
    std::fs::write(ws.join("docs/bench.svg"), svg)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results(entries: &[(&str, &str, f64)]) -> BTreeMap<String, BTreeMap<String, Vec<f64>>> {
        let mut raw: BTreeMap<String, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
        for (p, m, v) in entries {
            raw.entry(p.to_string())
                .or_default()
                .entry(m.to_string())
                .or_default()
                .push(*v);
        }
        raw
    }

    #[test]
    fn stats_are_min_median_max() {
        let s = stat(vec![3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.min, s.median, s.max), (1.0, 2.0, 3.0));
        let s = stat(vec![1.0, f64::NAN, 0.5]).unwrap();
        assert_eq!((s.min, s.median, s.max), (0.5, 0.75, 1.0));
        assert!(stat(vec![]).is_none());
        assert!(stat(vec![f64::NAN]).is_none());
    }

    #[test]
    fn ratios_and_goals_compare_medians_of_the_same_run() {
        let raw = results(&[
            ("ktctl", "latency_keepalive_p50_ms", 0.4),
            ("ktctl", "latency_keepalive_p50_ms", 0.5),
            ("ktctl", "latency_keepalive_p50_ms", 9.0),
            ("port-forward", "latency_keepalive_p50_ms", 0.5),
            ("kt-connect", "latency_keepalive_p50_ms", 0.8),
            ("ktctl", "bulk_1_stream_mib_s", 150.0),
            ("kt-connect", "bulk_1_stream_mib_s", 60.0),
        ]);
        let r = Report::new(raw, BTreeMap::new(), BTreeMap::new(), vec![], false, 3);
        assert_eq!(
            r.ratios.get("ktctl/port-forward latency_keepalive_p50_ms"),
            Some(&1.0)
        );
        let goal = |name: &str| r.goals.iter().find(|g| g.goal == name).unwrap();
        let p50 = goal("small-request p50 <= 0.5x kt-connect's");
        assert_eq!((p50.value, p50.met), (Some(0.625), Some(false)));
        let bulk = goal("bulk throughput (1 stream) >= 3x kt-connect's");
        assert_eq!((bulk.value, bulk.met), (Some(2.5), Some(false)));
        let fair = goal("fairness: small-request p99 under 4 bulk streams <= 2x idle p99");
        assert_eq!((fair.value, fair.met), (None, None));
    }

    #[test]
    fn an_unmeasured_path_shows_as_such_with_its_reason() {
        let raw = results(&[("ktctl", "new_connections_per_s", 3000.0)]);
        let mut why = BTreeMap::new();
        why.insert("kt-connect".to_string(), "no binary given".to_string());
        let r = Report::new(raw, BTreeMap::new(), why, vec![], true, 1);
        let md = markdown(&r);
        assert!(
            md.contains("**kt-connect**: not measured. no binary given"),
            "{md}"
        );
        assert!(
            md.contains("| new_connections_per_s (conn/s) | – | – | – | 3000 [3000–3000] |"),
            "{md}"
        );
        assert!(svg(&r).contains("kt-connect: not measured"));
        assert!(!md.contains("Inbound"), "no inbound table: {md}");
    }

    #[test]
    fn the_router_is_read_against_the_baseline_on_both_sides_of_it() {
        let m = "latency_keepalive_p50_ms";
        let raw = results(&[
            // Repeat 1: before 1.0, after 1.2; repeat 2: 1.0, 1.0; repeat 3: 1.1, 0.9.
            ("cluster-service", m, 1.0),
            ("cluster-service", m, 1.2),
            ("cluster-service", m, 1.0),
            ("cluster-service", m, 1.0),
            ("cluster-service", m, 1.1),
            ("cluster-service", m, 0.9),
            ("cluster-service-router", m, 1.1),
            ("cluster-service-router", m, 1.0),
            ("cluster-service-router", m, 1.03),
        ]);
        let r = Report::new(raw, BTreeMap::new(), BTreeMap::new(), vec![], false, 3);
        // Per repeat 1.0, 1.0, 1.03: median 1.0 (the medians' ratio would be 1.03).
        let key = format!("cluster-service-router/cluster-service {m}");
        assert_eq!(r.ratios[&key], 1.0);
        // Unbracketed (one baseline sample a repeat): the medians' ratio.
        let raw = results(&[
            ("cluster-service", m, 1.0),
            ("cluster-service-router", m, 1.03),
        ]);
        let r = Report::new(raw, BTreeMap::new(), BTreeMap::new(), vec![], false, 1);
        assert_eq!(r.ratios[&key], 1.03);
    }

    #[test]
    fn the_port_forward_by_direction_has_a_paragraph_and_no_table_rows() {
        let raw = results(&[
            ("ktctl", "bulk_1_stream_mib_s", 175.0),
            ("exchange", "bulk_1_stream_mib_s", 140.0),
            ("ktctl-forward", "upload_1_stream_mib_s", 150.0),
            ("ktctl-forward", "download_1_stream_mib_s", 200.0),
        ]);
        let r = Report::new(raw, BTreeMap::new(), BTreeMap::new(), vec![], true, 1);
        let md = markdown(&r);
        assert!(
            md.contains("up (to the pod) 150 [150–150] MiB/s, down 200 [200–200] MiB/s: up / down 0.75×. Exchange's downloads go up the port-forward and connect's come down it: exchange / connect bulk (1 stream) 0.80× is 1.07× of the port-forward's own up / down."),
            "{md}"
        );
        assert!(
            !md.contains("| upload_1_stream_mib_s"),
            "no table row: {md}"
        );
        let r = Report::new(
            results(&[("ktctl", "bulk_1_stream_mib_s", 175.0)]),
            BTreeMap::new(),
            BTreeMap::new(),
            vec![],
            true,
            1,
        );
        assert!(!markdown(&r).contains("port-forward alone"));
    }

    #[test]
    fn inbound_goals_compare_exchange_with_connect_and_the_router_with_the_service() {
        let raw = results(&[
            ("ktctl", "latency_keepalive_p50_ms", 0.5),
            ("exchange", "latency_keepalive_p50_ms", 0.55),
            ("ktctl", "latency_keepalive_p99_ms", 2.0),
            ("exchange", "latency_keepalive_p99_ms", 3.0),
            ("ktctl", "bulk_1_stream_mib_s", 120.0),
            ("exchange", "bulk_1_stream_mib_s", 90.0),
            ("cluster-service", "latency_keepalive_p50_ms", 0.1),
            ("mesh-no-header", "latency_keepalive_p50_ms", 0.25),
            // The router's goals read the median of the pinned readings' ratios to the ones
            // around them; neither the unpinned figures nor the pinned ones' medians.
            ("cluster-service-router", "latency_keepalive_p50_ms", 0.2),
            ("cluster-service", "pinned_keepalive_p50_us", 100.0),
            ("cluster-service-router", "pinned_keepalive_p50_us", 110.0),
            ("cluster-service", "bulk_1_stream_mib_s", 1000.0),
            ("cluster-service-router", "bulk_1_stream_mib_s", 1000.0),
            ("cluster-service", "pinned_bulk_1_stream_mib_s", 1000.0),
            (
                "cluster-service-router",
                "pinned_bulk_1_stream_mib_s",
                1000.0,
            ),
            (
                "cluster-service-router",
                "pinned_keepalive_p50_vs_without",
                1.0,
            ),
            (
                "cluster-service-router",
                "pinned_keepalive_p50_vs_without",
                1.01,
            ),
            (
                "cluster-service-router",
                "pinned_keepalive_p50_vs_without",
                1.5,
            ),
            (
                "cluster-service-router",
                "pinned_bulk_1_stream_vs_without",
                0.97,
            ),
            (
                "cluster-service-router-active",
                "pinned_keepalive_p50_vs_without",
                1.03,
            ),
            (
                "cluster-service-router-active",
                "pinned_bulk_1_stream_vs_without",
                0.99,
            ),
            ("exchange-ebpf", "latency_keepalive_p50_ms", 0.66),
            ("cluster-service-xdp", "latency_keepalive_p50_ms", 0.12),
        ]);
        let r = Report::new(raw, BTreeMap::new(), BTreeMap::new(), vec![], true, 1);
        let goal = |prefix: &str| {
            let g = r.goals.iter().find(|g| g.goal.starts_with(prefix)).unwrap();
            (g.value.map(|v| (v * 100.0).round() / 100.0), g.met)
        };
        assert_eq!(goal("exchange: small-request p50"), (Some(1.1), Some(true)));
        assert_eq!(
            goal("exchange: small-request p99"),
            (Some(1.5), Some(false))
        );
        assert_eq!(goal("exchange: bulk"), (Some(0.75), Some(false)));
        assert_eq!(goal("exchange: new connections"), (None, None));
        assert_eq!(goal("mesh router"), (Some(0.15), Some(true)));
        assert_eq!(
            goal("router DaemonSet, traffic it does not steer: small-request p50"),
            (Some(1.01), Some(true))
        );
        assert_eq!(
            goal("router DaemonSet, traffic it does not steer: bulk"),
            (Some(0.97), Some(false))
        );
        assert_eq!(
            goal(
                "router DaemonSet steering another Service, traffic it does not steer: small-request p50"
            ),
            (Some(1.03), Some(false))
        );
        assert_eq!(
            goal("router DaemonSet steering another Service, traffic it does not steer: bulk"),
            (Some(0.99), Some(true))
        );
        assert_eq!(goal("exchange --mode ebpf"), (Some(1.2), Some(false)));
        let md = markdown(&r);
        assert!(
            md.contains("| latency_keepalive_p50_ms (ms) | 0.10 [0.10–0.10] | 0.55 [0.55–0.55] | 0.25 [0.25–0.25] | – | 0.20 [0.20–0.20] | – | 0.66 [0.66–0.66] | 0.12 [0.12–0.12] | 1.10× | 2.50× | – | 2.00× | – | 1.20× | 1.20× |"),
            "{md}"
        );
        let inbound = &md[md.find("Inbound").unwrap()..md.find("| goal |").unwrap()];
        assert!(
            !inbound.contains("new_connections_per_s"),
            "rows no inbound path has are left out: {md}"
        );
    }
}
