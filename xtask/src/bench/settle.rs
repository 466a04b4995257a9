//! Before each path: the last path's teardown out of the way, so that it is not measured as
//! part of the next one. A session's shadow or a removed DaemonSet's pods go some seconds after
//! the command that removed them returns, and a deleted pod's network namespace is torn down by
//! a kernel worker after that; on a 2-core machine either takes a visible share of the next
//! path's CPU.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kt_testbed::Testbed;

use super::process::laptop;

/// How long to wait for terminating pods before measuring anyway (and saying so).
const PODS_WITHIN: Duration = Duration::from_secs(90);
/// How long to wait for a quiet machine before measuring anyway (and saying so).
const QUIET_WITHIN: Duration = Duration::from_secs(30);
/// Busy cores under which the machine counts as quiet: the testbed's idle control plane and
/// node agents stay well below it.
const QUIET_CORES: f64 = 1.0 / 3.0;

/// Waits until no pod is terminating anywhere in the cluster, then until the machine is quiet
/// for a second. Says what it waited for, and measures anyway after a bound.
pub(super) fn settle(tb: &Testbed, before: &str) -> Result<()> {
    let start = Instant::now();
    let mut going = terminating(tb)?;
    while !going.is_empty() && start.elapsed() < PODS_WITHIN {
        std::thread::sleep(Duration::from_millis(250));
        going = terminating(tb)?;
    }
    let pods = start.elapsed();
    if !going.is_empty() {
        eprintln!(
            "bench: {before}: pods still terminating after {:.0} s, measuring anyway: {}",
            pods.as_secs_f64(),
            going.join(" ")
        );
    } else if pods > Duration::from_secs(1) {
        eprintln!(
            "bench: {before}: waited {:.1} s for terminating pods to go",
            pods.as_secs_f64()
        );
    }
    let quiet_start = Instant::now();
    let mut busy = busy_cores(Duration::from_secs(1))?;
    let mut busy_seconds = 0;
    while busy >= QUIET_CORES && quiet_start.elapsed() < QUIET_WITHIN {
        busy_seconds += 1;
        busy = busy_cores(Duration::from_secs(1))?;
    }
    let waited = quiet_start.elapsed().saturating_sub(Duration::from_secs(1));
    if busy >= QUIET_CORES {
        eprintln!(
            "bench: {before}: the machine stayed busy ({busy:.2} cores) for {:.0} s, measuring anyway",
            waited.as_secs_f64()
        );
    } else if busy_seconds > 0 {
        eprintln!(
            "bench: {before}: waited {:.1} s for the machine to go quiet",
            waited.as_secs_f64()
        );
    }
    Ok(())
}

/// The cluster's terminating pods, as `namespace/name`.
fn terminating(tb: &Testbed) -> Result<Vec<String>> {
    let out = laptop(
        tb,
        &[
            "kubectl",
            "get",
            "pods",
            "-A",
            "-o",
            "jsonpath={range .items[?(@.metadata.deletionTimestamp)]}{.metadata.namespace}/{.metadata.name} {end}",
        ],
    )?;
    Ok(out.split_whitespace().map(str::to_string).collect())
}

/// How many cores the whole machine kept busy over `over`.
fn busy_cores(over: Duration) -> Result<f64> {
    let read = || {
        std::fs::read_to_string("/proc/stat")
            .context("reading /proc/stat")
            .and_then(|s| cpu_times(&s).context("no cpu line in /proc/stat"))
    };
    let a = read()?;
    std::thread::sleep(over);
    let b = read()?;
    Ok(busy_between(a, b, over))
}

/// The aggregate `cpu` line of /proc/stat: (busy, all) in clock ticks; idle and iowait count
/// as not busy.
fn cpu_times(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
    let all: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4).copied().unwrap_or(0);
    Some((all - idle, all))
}

/// Busy cores between two `cpu_times` readings `over` apart (ticks are 1/100 s: USER_HZ).
fn busy_between(a: (u64, u64), b: (u64, u64), over: Duration) -> f64 {
    let busy_ticks = b.0.saturating_sub(a.0) as f64;
    busy_ticks / 100.0 / over.as_secs_f64().max(1e-3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_cores_come_from_the_aggregate_cpu_line() {
        let a = "cpu  100 5 50 1000 20 3 2 0 0 0\ncpu0 50 2 25 500 10 1 1 0 0 0\nintr 1\n";
        let b = "cpu  160 5 80 1100 30 3 12 0 7 0\ncpu0 80 2 40 550 15 1 6 0 0 0\nintr 1\n";
        let (ta, tb) = (cpu_times(a).unwrap(), cpu_times(b).unwrap());
        assert_eq!(ta, (160, 1180));
        // user +60, system +30, softirq +10 over one second: one core busy; guest is in user.
        assert_eq!(tb, (260, 1390));
        assert!((busy_between(ta, tb, Duration::from_secs(1)) - 1.0).abs() < 1e-9);
        assert!((busy_between(ta, tb, Duration::from_secs(2)) - 0.5).abs() < 1e-9);
        assert_eq!(cpu_times("cpu0 1 2 3 4\n"), None);
        assert_eq!(cpu_times("cpu  1 x 3 4\n"), None);
    }
}
