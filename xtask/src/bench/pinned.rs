//! The Service's small-request p50 and one-stream bulk throughput with the client and the
//! nginx pod's workers pinned to one core: the reading precise enough for the router's 2%
//! goals.
//!
//! Unpinned, where the scheduler puts wrk and nginx (one core or two, and when it moves them)
//! sets a run's p50: on a 2-core machine consecutive 5 s runs of the same path ranged from 90 to
//! 123 µs, five times the margin a 2% goal checks. With both on one core the same runs agreed
//! within about 2% (55-57 µs), and every packet's work, the router's programs' included, is
//! on that core's clock, so what the router adds shows in full. The small requests' p50 is
//! timed by `bench-tool latency` on a nanosecond clock (wrk's percentiles have 1 µs steps,
//! about 2% of this p50: the first runs of this measurement with wrk gave nothing but whole
//! µs). A reading takes several short runs of each workload and keeps their trimmed mean. The
//! bulk figure is timed the same way, by `bench-tool throughput` (the file downloaded again
//! and again on one connection for as long as a p50 run), not by single downloads of the
//! file: one of those takes a fifth of a second at these rates, and five of them ranged over
//! ±12% in one phase where the time-bounded runs kept within about ±1%. Readings minutes apart
//! still differ by several per cent: the bench compares only neighbouring ones
//! ([`against_without`]).

use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail};
use kt_testbed::Testbed;

use super::load::{Origin, Sizes, Values, push};
use super::process::laptop;

/// One pinned reading of the Service: the trimmed means of its runs.
#[derive(Clone, Copy, Debug)]
pub(super) struct Sample {
    /// Small-request p50, µs (`pinned_keepalive_p50_us`).
    pub(super) p50_us: f64,
    /// One-stream bulk throughput, MiB/s (`pinned_bulk_1_stream_mib_s`).
    pub(super) bulk_mib_s: f64,
}

impl Sample {
    /// Records this reading in a path's `values`.
    pub(super) fn push(&self, values: &mut Values) {
        push(values, "pinned_keepalive_p50_us", Some(self.p50_us));
        push(values, "pinned_bulk_1_stream_mib_s", Some(self.bulk_mib_s));
    }
}

/// A reading over the mean of the two around it, figure by figure.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Ratio {
    pub(super) p50: f64,
    pub(super) bulk: f64,
}

/// Each reading of `readings` (path, reading, in the order taken) that is not `base`'s, set
/// against the mean of the `base` readings just before and after it. A reading without a
/// `base` one on both sides has no ratio.
pub(super) fn against_without<'a>(
    readings: &[(&'a str, Sample)],
    base: &str,
) -> Vec<(&'a str, Ratio)> {
    readings
        .windows(3)
        .filter_map(|w| match w {
            [(b0, before), (path, with), (b1, after)]
                if *b0 == base && *b1 == base && *path != base =>
            {
                Some((
                    *path,
                    Ratio {
                        p50: with.p50_us / ((before.p50_us + after.p50_us) / 2.0),
                        bulk: with.bulk_mib_s / ((before.bulk_mib_s + after.bulk_mib_s) / 2.0),
                    },
                ))
            }
            _ => None,
        })
        .collect()
}

/// The pinned small-request p50 and one-stream bulk throughput from `client` to the Service at
/// `service_ip`, the workers of the nginx in `nginx_pod` on the same core as the client's
/// requests (the client pod holds this program as [`TOOL`], put there by [`install_tool`]).
pub(super) fn measure(
    tb: &Testbed,
    client: &Origin,
    service_ip: &str,
    nginx_pod: &str,
    s: &Sizes,
) -> Result<Sample> {
    let cpu = core();
    let _pinned = Pinned::nginx(tb, nginx_pod, cpu)?;
    let secs = (s.secs / 4).max(1);
    let runs = |what: &str, path: &str| -> Result<f64> {
        let v = (0..s.pinned_runs)
            .map(|_| {
                let out = client.sh(
                    tb,
                    &format!(
                        "taskset -c {cpu} {TOOL} bench-tool {what} {service_ip}:80 {path} {secs}"
                    ),
                )?;
                out.split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .with_context(|| format!("no figure in bench-tool {what}'s output: {out:?}"))
            })
            .collect::<Result<Vec<f64>>>()?;
        trimmed_mean(v).with_context(|| format!("no run of bench-tool {what}"))
    };
    Ok(Sample {
        p50_us: runs("latency", "/1k")?,
        bulk_mib_s: runs("throughput", "/bulk")?,
    })
}

/// Where the client pod holds this program, for `bench-tool latency` and `throughput`.
const TOOL: &str = "/tmp/kt-bench-tool";

/// Copies this program into the client `pod` as [`TOOL`]. (A pod's root is an overlay on this
/// machine's, which shows files changed under it after the pod started only by chance: a fresh
/// build of this program may not be what the pod sees at its path.)
pub(super) fn install_tool(tb: &Testbed, pod: &str, xtask: &Path) -> Result<()> {
    let from = xtask.display().to_string();
    laptop(tb, &["kubectl", "cp", &from, &format!("{pod}:{TOOL}")])
        .with_context(|| format!("copying {from} into pod {pod}"))?;
    Ok(())
}

/// The core everything is pinned to: the last one this process may use (away from CPU 0, where
/// much of a machine's housekeeping lands).
fn core() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from) - 1
}

/// The mean without the lowest and the highest value (of three or more): one run the machine
/// disturbed does not move it.
fn trimmed_mean(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let kept = if v.len() >= 3 {
        &v[1..v.len() - 1]
    } else {
        &v[..]
    };
    (!kept.is_empty()).then(|| kept.iter().sum::<f64>() / kept.len() as f64)
}

/// Processes pinned to one core, given back their former affinity when dropped.
struct Pinned {
    former: Vec<(libc::pid_t, libc::cpu_set_t)>,
}

impl Pinned {
    /// The nginx pod's workers (the testbed's pods are this machine's processes: the master's
    /// pid file names one of them), pinned to `cpu`.
    fn nginx(tb: &Testbed, pod: &str, cpu: usize) -> Result<Pinned> {
        let master: libc::pid_t = laptop(
            tb,
            &["kubectl", "exec", pod, "--", "cat", "/var/run/nginx.pid"],
        )?
        .trim()
        .parse()
        .context("the nginx pod's /var/run/nginx.pid")?;
        let cmdline = fs::read(format!("/proc/{master}/cmdline")).unwrap_or_default();
        if !cmdline.starts_with(b"nginx: master") {
            bail!(
                "pid {master} (the nginx pod's master) is not an nginx master on this machine: its pods run in a pid namespace of their own"
            );
        }
        let children = fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
            .with_context(|| format!("the children of nginx master {master}"))?;
        let workers: Vec<libc::pid_t> = children
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .context("/proc/PID/task/PID/children")?;
        if workers.is_empty() {
            bail!("nginx master {master} has no workers");
        }
        let mut pinned = Pinned { former: vec![] };
        for pid in workers {
            pinned.former.push((pid, affinity(pid)?));
            set_affinity(pid, &one(cpu)).with_context(|| format!("pinning nginx worker {pid}"))?;
        }
        Ok(pinned)
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        for (pid, set) in &self.former {
            if let Err(e) = set_affinity(*pid, set) {
                eprintln!("bench: giving nginx worker {pid} its CPUs back failed: {e:#}");
            }
        }
    }
}

fn one(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is a plain bit array; all zeros is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    assert!(
        cpu < libc::CPU_SETSIZE as usize,
        "CPU {cpu} is past cpu_set_t"
    );
    // SAFETY: `cpu` is inside the set, as asserted.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    set
}

fn affinity(pid: libc::pid_t) -> Result<libc::cpu_set_t> {
    // SAFETY: as in `one`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: writes at most size_of::<cpu_set_t>() bytes into `set`.
    if unsafe { libc::sched_getaffinity(pid, size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("the CPUs of pid {pid}"));
    }
    Ok(set)
}

fn set_affinity(pid: libc::pid_t, set: &libc::cpu_set_t) -> Result<()> {
    // SAFETY: reads size_of::<cpu_set_t>() bytes from `set`.
    if unsafe { libc::sched_setaffinity(pid, size_of::<libc::cpu_set_t>(), set) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_reading_is_set_against_the_two_without_around_it() {
        let r = |p50_us, bulk_mib_s| Sample { p50_us, bulk_mib_s };
        let readings = [
            ("base", r(100.0, 1000.0)),
            ("idle", r(103.0, 1000.0)),
            ("base", r(106.0, 1100.0)),
            ("active", r(104.0, 1050.0)),
            ("base", r(102.0, 1000.0)),
            // Cut short: no reading without the router after it.
            ("idle", r(500.0, 1.0)),
        ];
        let ratios = against_without(&readings, "base");
        assert_eq!(
            ratios,
            [
                (
                    "idle",
                    Ratio {
                        p50: 1.0,
                        bulk: 1000.0 / 1050.0
                    }
                ),
                (
                    "active",
                    Ratio {
                        p50: 1.0,
                        bulk: 1.0
                    }
                ),
            ]
        );
    }

    #[test]
    fn the_trimmed_mean_leaves_out_the_extremes_of_three_or_more() {
        assert_eq!(
            trimmed_mean(vec![56.0, 66.0, 55.0, 57.0, 56.0]),
            Some((56.0 + 56.0 + 57.0) / 3.0)
        );
        assert_eq!(trimmed_mean(vec![2.0, 4.0]), Some(3.0));
        assert_eq!(trimmed_mean(vec![f64::NAN]), None);
        assert_eq!(trimmed_mean(vec![]), None);
    }

    fn cpus(set: &libc::cpu_set_t) -> Vec<usize> {
        (0..libc::CPU_SETSIZE as usize)
            // SAFETY: every index is inside the set.
            .filter(|&c| unsafe { libc::CPU_ISSET(c, set) })
            .collect()
    }

    #[test]
    fn a_process_is_pinned_and_given_its_cpus_back() {
        // A child of this test, so that nothing else is touched.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as libc::pid_t;
        let before = affinity(pid).unwrap();
        let cpu = core();
        {
            let _p = Pinned {
                former: vec![(pid, before)],
            };
            set_affinity(pid, &one(cpu)).unwrap();
            assert_eq!(cpus(&affinity(pid).unwrap()), [cpu]);
        }
        assert_eq!(cpus(&affinity(pid).unwrap()), cpus(&before));
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
