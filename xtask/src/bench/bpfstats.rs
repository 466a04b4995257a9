//! What the router's programs themselves cost, read from the kernel's BPF run-time statistics
//! (on only while a measurement runs): the end-to-end comparison with and without the router
//! moves by more than the 2% it is held to between repeats on a shared machine, while the
//! programs' own run time is what the router adds to a packet's path, and XDP could at most
//! save.

use std::os::fd::OwnedFd;

use anyhow::{Context, Result};

/// The router's programs: tc on the pods' veths, sock_addr on the nodes' cgroups.
const PREFIXES: [&str; 2] = ["kt_tc_", "kt_host_"];

/// Run time and runs of the router's programs, summed over every node (all of them are
/// this machine's kernel).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct RunTime {
    pub(super) ns: u64,
    pub(super) runs: u64,
}

impl std::ops::Sub for RunTime {
    type Output = RunTime;
    fn sub(self, o: RunTime) -> RunTime {
        RunTime {
            ns: self.ns.saturating_sub(o.ns),
            runs: self.runs.saturating_sub(o.runs),
        }
    }
}

/// BPF run-time statistics, on while this lives (the kernel turns them off when the last
/// holder's descriptor closes; nothing stays changed).
pub(super) struct StatsOn(#[allow(dead_code, reason = "held for its Drop")] OwnedFd);

impl StatsOn {
    pub(super) fn new() -> Result<StatsOn> {
        aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .map(StatsOn)
            .context("turning on BPF run-time statistics (BPF_ENABLE_STATS needs CAP_SYS_ADMIN)")
    }

    /// The router's programs' totals now; none loaded is an error (nothing to measure).
    pub(super) fn router(&self) -> Result<RunTime> {
        let mut total = RunTime::default();
        let mut found = 0;
        for info in aya::programs::loaded_programs() {
            let Ok(info) = info else { continue };
            let name = info.name_as_str().unwrap_or("");
            if PREFIXES.iter().any(|p| name.starts_with(p)) {
                total.ns += info.run_time().as_nanos() as u64;
                total.runs += info.run_count();
                found += 1;
            }
        }
        anyhow::ensure!(found > 0, "no program of the router is loaded");
        Ok(total)
    }
}

/// The share (%) of `wall_ns` that `spent` ran in the router's programs.
pub(super) fn percent(spent: RunTime, wall_ns: f64) -> Option<f64> {
    (wall_ns > 0.0).then(|| 100.0 * spent.ns as f64 / wall_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_of_the_wall_time_and_differences_never_wrap() {
        let a = RunTime { ns: 500, runs: 10 };
        let b = RunTime {
            ns: 2_500,
            runs: 30,
        };
        assert_eq!(
            b - a,
            RunTime {
                ns: 2_000,
                runs: 20
            }
        );
        assert_eq!(a - b, RunTime::default());
        assert_eq!(percent(b - a, 100_000.0), Some(2.0));
        assert_eq!(percent(b - a, 0.0), None);
    }
}
