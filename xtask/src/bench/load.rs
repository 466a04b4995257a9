//! The load every path gets: wrk and curl, run from the laptop or from a client pod in the
//! cluster, and what their output says.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use kt_testbed::Testbed;

use super::process::{Group, laptop, sh};

/// Raw values of one path: metric -> one value per repeat.
pub(super) type Values = BTreeMap<String, Vec<f64>>;

pub(super) fn push(values: &mut Values, metric: &str, v: Option<f64>) {
    if let Some(v) = v {
        values.entry(metric.to_string()).or_default().push(v);
    }
}

/// Parses wrk's --latency distribution: the value at `pct` ("50%") in milliseconds.
pub(super) fn wrk_percentile(out: &str, pct: &str) -> Option<f64> {
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

/// wrk's count of requests completed ("  12345 requests in 10.00s, ...").
pub(super) fn wrk_requests(out: &str) -> Option<u64> {
    out.lines()
        .find(|l| l.contains(" requests in "))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn wrk_rate(out: &str) -> Option<f64> {
    out.lines()
        .find(|l| l.starts_with("Requests/sec:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// How long each run lasts and how large the files are (the quick run's are smaller).
pub(super) struct Sizes {
    pub(super) secs: u32,
    pub(super) bulk_mib: u32,
    pub(super) idle_conns: usize,
    pub(super) conn_rate_n: usize,
    /// Runs of each workload in a reading of the pinned measurement (`pinned`).
    pub(super) pinned_runs: usize,
    /// Readings with the router idle in each repeat's pinned comparison, each between two
    /// without it (`Inbound::router_alternation`).
    pub(super) router_cycles: usize,
}

/// Where a path's load runs: the laptop, or a client pod in the cluster (through `kubectl
/// exec`; a pod here sees this machine's tools, wrk and curl among them).
pub(super) enum Origin {
    Laptop,
    Pod(String),
}

impl Origin {
    /// Runs a shell line there; its output.
    pub(super) fn sh(&self, tb: &Testbed, line: &str) -> Result<String> {
        match self {
            Origin::Laptop => sh(tb, line),
            Origin::Pod(pod) => laptop(tb, &["kubectl", "exec", pod, "--", "sh", "-c", line]),
        }
    }

    /// Starts a shell line there as a process group of its own, ended when dropped.
    fn start(&self, tb: &Testbed, line: &str) -> Result<Group> {
        match self {
            Origin::Laptop => Group::start(tb, line),
            Origin::Pod(pod) => Group::start_in_pod(tb, pod, line),
        }
    }
}

/// The load of every path from `from` to `base`, each request with `header` if given (a mesh
/// route's).
pub(super) fn measure_path(
    tb: &Testbed,
    from: &Origin,
    base: &str,
    header: Option<&str>,
    s: &Sizes,
    results: &mut Values,
) -> Result<()> {
    let d = format!("{}s", s.secs);
    let h = header.map(|h| format!(" -H '{h}'")).unwrap_or_default();
    let mut push = |k: &str, v: Option<f64>| push(results, k, v);
    let ka = from.sh(tb, &format!("wrk -t1 -c1 -d{d} --latency{h} {base}/1k"))?;
    push("latency_keepalive_p50_ms", wrk_percentile(&ka, "50%"));
    push("latency_keepalive_p99_ms", wrk_percentile(&ka, "99%"));
    let nc = from.sh(
        tb,
        &format!("wrk -t1 -c1 -d{d} --latency{h} -H 'Connection: close' {base}/1k"),
    )?;
    push("latency_newconn_p50_ms", wrk_percentile(&nc, "50%"));
    push("latency_newconn_p99_ms", wrk_percentile(&nc, "99%"));
    let one = from.sh(
        tb,
        &format!("curl -sS -o /dev/null -m 300{h} -w '%{{speed_download}}' {base}/bulk"),
    )?;
    push(
        "bulk_1_stream_mib_s",
        one.trim().parse::<f64>().ok().map(|b| b / 1048576.0),
    );
    // Timed where the downloads run: a `kubectl exec` takes longer to start than the quick
    // run's downloads take on the fastest paths.
    let ns = from.sh(
        tb,
        &format!(
            "s=$(date +%s%N) && seq 8 | xargs -P 8 -I{{}} curl -sS -o /dev/null -m 600{h} {base}/bulk && echo $(($(date +%s%N) - s))"
        ),
    )?;
    push(
        "bulk_8_streams_mib_s",
        ns.trim()
            .parse::<f64>()
            .ok()
            .map(|ns| 8.0 * f64::from(s.bulk_mib) / (ns / 1e9)),
    );
    // Four bulk downloads in a loop (a process group of ours, ended by its id) while small
    // requests are timed.
    let bulk = from.start(
        tb,
        &format!(
            "for i in 1 2 3 4; do (while :; do curl -sS -o /dev/null -m 600{h} {base}/bulk || exit; done) & done; wait"
        ),
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let fair = from.sh(tb, &format!("wrk -t1 -c1 -d{d} --latency{h} {base}/1k"));
    drop(bulk);
    push("fairness_p99_under_bulk_ms", wrk_percentile(&fair?, "99%"));
    // In the log, to explain a rate that differs from its neighbours': how many of the
    // client's ports wait in TIME_WAIT (a client short of ports spends its time looking for
    // one), what the machine's CPU went to, and the client's TCP trouble counters (a SYN
    // retransmitted waits a second). nstat keeps its baseline in a file: the load's own,
    // removed after reading.
    let file = format!("/tmp/kt-bench-nstat-{}", std::process::id());
    let history = format!("NSTAT_HISTORY={file}");
    let waiting = from
        .sh(
            tb,
            &format!("ss -tan state time-wait | wc -l; {history} nstat -n"),
        )
        .unwrap_or_default();
    let (before, started) = (super::profile::cpu_times(), std::time::Instant::now());
    let conns = from.sh(
        tb,
        &format!("wrk -t2 -c16 -d{d}{h} -H 'Connection: close' {base}/1k"),
    )?;
    let cores =
        super::profile::cores_by_process(&before, &super::profile::cpu_times(), started.elapsed());
    let top: Vec<String> = cores
        .iter()
        .take(8)
        .map(|(p, c)| format!("{p} {c:.2}"))
        .collect();
    let counters = from
        .sh(
            tb,
            &format!(
                "{history} nstat | grep -E 'Retrans|Timeouts|AttemptFails|Resets|OutRsts|PAWS|TWRecycled|ListenDrops'; rm -f {file}"
            ),
        )
        .unwrap_or_default();
    eprintln!(
        "bench: new connections/s {:?} ({} TIME_WAIT before); cores: {}; client counters: {}",
        wrk_rate(&conns),
        waiting.trim(),
        top.join(", "),
        counters.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    push("new_connections_per_s", wrk_rate(&conns));
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
        assert_eq!(wrk_requests(WRK), Some(5000));
        assert_eq!(wrk_requests("Requests/sec: 1"), None);
    }
}
