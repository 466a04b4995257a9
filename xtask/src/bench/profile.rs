//! Where the time goes when ktctl misses a goal: the workload of that goal is run once more
//! through ktctl while `perf` samples ktctl and its shadow (DWARF call stacks), and every
//! process's CPU time is read from /proc before and after. The outputs are a flame graph per
//! workload (inferno) and, in the report, the CPU each process used and the functions with
//! the most samples of their own.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use inferno::collapse::Collapse;
use serde::Serialize;

/// A workload to profile, named after the goal it explains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Small keep-alive requests, one at a time.
    Latency,
    /// One download after another.
    Bulk,
    /// Small requests while four downloads run.
    Fairness,
    /// Short connections from 16 clients.
    NewConnections,
    /// connect() to a loopback server (not through ktctl): the hooks' cost.
    Hooks,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Latency => "latency",
            Workload::Bulk => "bulk",
            Workload::Fairness => "fairness",
            Workload::NewConnections => "new-connections",
            Workload::Hooks => "hooks",
        }
    }

    /// The load, a shell line run in the laptop until it is ended (`base` is the URL of the
    /// nginx pod through ktctl); `None` for [`Workload::Hooks`], whose own process is profiled.
    pub fn load(self, base: &str) -> Option<String> {
        let bulk = format!("(while :; do curl -sS -o /dev/null -m 600 {base}/bulk || exit; done)");
        Some(match self {
            Workload::Latency => format!("wrk -t1 -c1 -d1h {base}/1k"),
            Workload::Bulk => bulk,
            Workload::Fairness => {
                format!("for i in 1 2 3 4; do {bulk} & done; wrk -t1 -c1 -d1h {base}/1k")
            }
            Workload::NewConnections => {
                format!("wrk -t2 -c16 -d1h -H 'Connection: close' {base}/1k")
            }
            Workload::Hooks => return None,
        })
    }
}

/// The arguments of a `perf record` into `data` of `pids` for `secs` seconds, or, with no
/// pids, of `command`.
pub fn record_args(data: &str, pids: &[u32], secs: u32, command: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "perf",
        "record",
        "-q",
        "-F",
        "499",
        "--call-graph",
        "dwarf,16384",
        "-o",
        data,
    ]
    .map(String::from)
    .to_vec();
    if pids.is_empty() {
        args.push("--".into());
        args.extend(command.iter().map(|a| a.to_string()));
    } else {
        let list: Vec<String> = pids.iter().map(u32::to_string).collect();
        args.extend(["-p".into(), list.join(","), "--".into(), "sleep".into()]);
        args.push(secs.to_string());
    }
    args
}

/// Whether `perf` can sample here; the reason when not.
pub fn available() -> Result<(), String> {
    match Command::new("perf").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "`perf --version` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!(
            "perf is not installed ({e}); `cargo xtask setup` installs Debian's linux-perf"
        )),
    }
}

/// Folded stacks ("comm;outer;...;leaf count" lines) of a `perf record` file.
pub fn fold(data: &Path) -> Result<String> {
    let out = Command::new("perf")
        .args(["script", "-i"])
        .arg(data)
        .output()
        .context("running perf script")?;
    if !out.status.success() {
        bail!(
            "perf script: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut options = inferno::collapse::perf::Options::default();
    options.annotate_kernel = true;
    let mut folder = inferno::collapse::perf::Folder::from(options);
    let mut folded = Vec::new();
    folder
        .collapse(&out.stdout[..], &mut folded)
        .context("folding perf's stacks")?;
    String::from_utf8(folded).context("folded stacks are not UTF-8")
}

/// [`fold`]s a `perf record` file and removes it (it can be tens of MiB).
pub fn take_folded(data: &Path) -> Result<String> {
    let folded = fold(data);
    let _ = std::fs::remove_file(data);
    folded
}

/// A flame graph (SVG) of folded stacks.
pub fn flamegraph(folded: &str, title: &str) -> Result<Vec<u8>> {
    let mut opt = inferno::flamegraph::Options::default();
    opt.title = title.to_string();
    // perf's cpu-clock samples are weighed by their period: nanoseconds of CPU time.
    opt.count_name = "ns of CPU".to_string();
    let mut svg = Vec::new();
    inferno::flamegraph::from_lines(&mut opt, folded.lines(), &mut svg)
        .context("drawing the flame graph")?;
    Ok(svg)
}

/// The (stack, count) pairs of folded stacks; lines that are not one are skipped.
fn stacks(folded: &str) -> impl Iterator<Item = (&str, u64)> {
    folded.lines().filter_map(|line| {
        let (stack, count) = line.rsplit_once(' ')?;
        Some((stack, count.parse().ok()?))
    })
}

/// A function with much CPU time of its own.
#[derive(Serialize, Debug, PartialEq)]
pub struct Hot {
    pub process: String,
    pub function: String,
    /// The nearest caller in ktctl's own code (ktctl, kt_common, kt_router), if any.
    pub from: Option<String>,
    pub percent: f64,
}

/// The `n` functions with the most CPU time of their own, as shares of all of it.
pub fn hottest(folded: &str, n: usize) -> Vec<Hot> {
    let mut by: HashMap<(String, String, Option<String>), u64> = HashMap::new();
    let mut total = 0u64;
    for (stack, count) in stacks(folded) {
        let frames: Vec<&str> = stack.split(';').collect();
        // The process's name, then at least one function.
        let [process, .., _] = frames[..] else {
            continue;
        };
        let from = frames[1..frames.len() - 1]
            .iter()
            .rev()
            .map(|f| short(f))
            .find(|f| {
                ["ktctl::", "kt_common::", "kt_router::"]
                    .iter()
                    .any(|o| f.contains(o))
            });
        total += count;
        *by.entry((process.to_string(), function(&frames), from))
            .or_default() += count;
    }
    let mut hot: Vec<Hot> = by
        .into_iter()
        .map(|((process, function, from), c)| Hot {
            process,
            function,
            from,
            percent: 100.0 * c as f64 / total.max(1) as f64,
        })
        .collect();
    hot.sort_by(|a, b| {
        b.percent
            .total_cmp(&a.percent)
            .then(a.function.cmp(&b.function))
    });
    hot.truncate(n);
    hot
}

/// The function a stack's sample is charged to: its leaf; for the kernel, what the kernel was
/// doing (a kernel leaf is where the sampling interrupt could land, not where time went): the
/// system call, page faults, interrupts.
fn function(frames: &[&str]) -> String {
    let leaf = frames.last().copied().unwrap_or_default();
    if !leaf.ends_with("_[k]") {
        return short(leaf);
    }
    let kernel: Vec<&str> = frames.iter().map(|f| f.trim_end_matches("_[k]")).collect();
    if let Some(i) = kernel.iter().position(|f| *f == "do_syscall_64") {
        let Some(&call) = kernel.get(i + 1) else {
            return "kernel: system call entry".to_string();
        };
        if call.starts_with("exit_to_user_mode") || call.starts_with("syscall_exit") {
            return "kernel: scheduling at a system call's return".to_string();
        }
        let call = ["__x64_sys_", "__do_sys_", "__se_sys_", "ksys_", "do_"]
            .iter()
            .find_map(|p| call.strip_prefix(p))
            .unwrap_or(call);
        return format!("kernel: {call}()");
    }
    if kernel.iter().any(|f| f.starts_with("asm_exc_page_fault")) {
        return "kernel: page faults".to_string();
    }
    if kernel
        .iter()
        .any(|f| f.starts_with("asm_sysvec_") || f.starts_with("asm_common_interrupt"))
    {
        return "kernel: interrupts".to_string();
    }
    "kernel: other".to_string()
}

/// The share (percent) of CPU time in stacks that pass through BPF programs of the kinds
/// ktctl attaches (cgroup socket-address hooks, socket storage, sk_lookup).
pub fn bpf_percent(folded: &str) -> f64 {
    let (mut bpf, mut total) = (0u64, 0u64);
    for (stack, count) in stacks(folded) {
        total += count;
        if [
            "__cgroup_bpf_run",
            ";bpf_prog_",
            "bpf_sk_storage",
            "bpf_sk_lookup",
        ]
        .iter()
        .any(|f| stack.contains(f))
        {
            bpf += count;
        }
    }
    100.0 * bpf as f64 / total.max(1) as f64
}

/// A Rust symbol without its generic arguments (`poll<..>` → `poll`), which make perf's
/// names of async code hundreds of characters long; `<A as B>::f` keeps its `<A as B>`.
pub fn short(symbol: &str) -> String {
    let mut out = String::with_capacity(symbol.len());
    let mut depth = 0usize;
    let mut prev = ' ';
    for c in symbol.chars() {
        match c {
            '<' if depth > 0 || prev.is_alphanumeric() || prev == '_' || prev == '}' => depth += 1,
            '>' if depth > 0 => depth -= 1,
            _ if depth > 0 => {}
            _ => out.push(c),
        }
        prev = c;
    }
    out
}

/// CPU time (user + system, seconds) of every process now, by pid: (name, seconds).
pub fn cpu_times() -> HashMap<u32, (String, f64)> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut all = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return all;
    };
    for e in dir.filter_map(|e| e.ok()) {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(t) = std::fs::read_to_string(e.path().join("stat"))
            .ok()
            .and_then(|s| parse_stat(&s, hz))
        {
            all.insert(pid, t);
        }
    }
    all
}

/// (comm, utime + stime in seconds) of a /proc/PID/stat line.
fn parse_stat(stat: &str, hz: f64) -> Option<(String, f64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    // After ")": state is field 3; utime and stime are fields 14 and 15.
    let mut rest = stat.get(close + 1..)?.split_whitespace().skip(11);
    let utime: f64 = rest.next()?.parse().ok()?;
    let stime: f64 = rest.next()?.parse().ok()?;
    Some((comm, (utime + stime) / hz))
}

/// Cores used by each process name between two [`cpu_times`] readings `elapsed` apart (of
/// the processes alive at the second; those that started between count from zero), the
/// busiest first, at least 0.01 core.
pub fn cores_by_process(
    before: &HashMap<u32, (String, f64)>,
    after: &HashMap<u32, (String, f64)>,
    elapsed: Duration,
) -> Vec<(String, f64)> {
    let mut by: BTreeMap<String, f64> = BTreeMap::new();
    for (pid, (comm, t)) in after {
        let t0 = before
            .get(pid)
            .filter(|(c, _)| c == comm)
            .map_or(0.0, |(_, t0)| *t0);
        // Kernel workers are named after their current work item: one "kworker" line.
        let name = if comm.starts_with("kworker/") {
            "kworker"
        } else {
            comm
        };
        *by.entry(name.to_string()).or_default() += (t - t0).max(0.0);
    }
    let secs = elapsed.as_secs_f64().max(1e-3);
    let mut v: Vec<(String, f64)> = by
        .into_iter()
        .map(|(c, t)| (c, t / secs))
        .filter(|(_, cores)| *cores >= 0.01)
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

/// One workload's profile in the report.
#[derive(Serialize, Debug)]
pub struct Profile {
    pub workload: Workload,
    /// The missed goals it explains.
    pub goals: Vec<String>,
    /// Cores used by each process while it ran, the busiest first.
    pub cores: Vec<(String, f64)>,
    /// The functions of ktctl and its shadow with the most CPU time of their own.
    pub hottest: Vec<Hot>,
    /// The share (percent) of the profiled processes' CPU time in cgroup BPF programs.
    pub bpf_percent: f64,
    /// The flame graph's file name, beside the report.
    pub flamegraph: Option<String>,
    /// Why there is no profile, when there is none.
    pub error: Option<String>,
}

/// Markdown of the profiles.
pub fn markdown(profiles: &[Profile]) -> String {
    if profiles.is_empty() {
        return String::new();
    }
    let mut s = String::from("\n### Where the time goes\n");
    for p in profiles {
        s += &format!(
            "\n**{}** (profiled for: {}).",
            p.workload.name(),
            p.goals.join("; ")
        );
        if let Some(e) = &p.error {
            s += &format!(" No profile: {e}\n");
            continue;
        }
        let cores: Vec<String> = p
            .cores
            .iter()
            .take(8)
            .map(|(c, n)| format!("{c} {n:.2}"))
            .collect();
        s += &format!(
            " Cores used: {}. In cgroup BPF programs: {:.1}% of the profiled CPU time.",
            cores.join(", "),
            p.bpf_percent
        );
        if let Some(f) = &p.flamegraph {
            s += &format!(" Flame graph: `target/bench/{f}`.");
        }
        s +=
            "\n\n| process | function (own CPU time) | reached from | share |\n|---|---|---|---|\n";
        for h in &p.hottest {
            s += &format!(
                "| {} | `{}` | {} | {:.1}% |\n",
                h.process,
                h.function,
                h.from
                    .as_deref()
                    .map_or_else(|| "–".to_string(), |f| format!("`{f}`")),
                h.percent
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbols_lose_their_generic_arguments_only() {
        assert_eq!(
            short("poll_read<tokio_rustls::client::TlsStream<ktctl::X<Y>>>"),
            "poll_read"
        );
        assert_eq!(
            short("<yamux::Stream as futures_io::AsyncRead>::poll_read"),
            "<yamux::Stream as futures_io::AsyncRead>::poll_read"
        );
        assert_eq!(
            short("<kt_common::tunnel::Transport<T> as tokio::io::AsyncRead>::poll_read"),
            "<kt_common::tunnel::Transport as tokio::io::AsyncRead>::poll_read"
        );
        assert_eq!(
            short("finish_task_switch.isra.0_[k]"),
            "finish_task_switch.isra.0_[k]"
        );
        assert_eq!(
            short("{closure#0}<ktctl::main::{async_block_env#0}>"),
            "{closure#0}"
        );
    }

    #[test]
    fn the_hottest_functions_are_shares_of_all_samples_with_their_caller_in_our_code() {
        let folded = "\
ktctl;main;ktctl::proxy::splice;memcpy 20
ktctl;main;ktctl::proxy::splice;do_syscall_64_[k];__x64_sys_sendto_[k];tcp_sendmsg_[k];_raw_spin_unlock_[k] 6
ktctl;main;ktctl::proxy::splice;do_syscall_64_[k];__x64_sys_sendto_[k];finish_task_switch_[k] 4
ktctl;main;ktctl::cluster::PortForward::poll_read<X>;memset 50
ktctl;main;memset 5
kt-router;main;kt_router::serve;ring::aes<Y> 15
";
        let hot = hottest(folded, 4);
        assert_eq!(
            hot,
            vec![
                Hot {
                    process: "ktctl".into(),
                    function: "memset".into(),
                    from: Some("ktctl::cluster::PortForward::poll_read".into()),
                    percent: 50.0
                },
                Hot {
                    process: "ktctl".into(),
                    function: "memcpy".into(),
                    from: Some("ktctl::proxy::splice".into()),
                    percent: 20.0
                },
                Hot {
                    process: "kt-router".into(),
                    function: "ring::aes".into(),
                    from: Some("kt_router::serve".into()),
                    percent: 15.0
                },
                Hot {
                    process: "ktctl".into(),
                    function: "kernel: sendto()".into(),
                    from: Some("ktctl::proxy::splice".into()),
                    percent: 10.0
                },
            ]
        );
        assert!(hottest("garbage\n; x\nktctl 5\n", 3).is_empty());
        assert_eq!(bpf_percent(folded), 0.0);
    }

    #[test]
    fn kernel_time_is_charged_to_what_the_kernel_was_doing() {
        let k = |s: &str| function(&s.split(';').collect::<Vec<_>>());
        assert_eq!(
            k("x;entry_SYSCALL_64_[k];do_syscall_64_[k];do_writev_[k];tcp_sendmsg_[k]"),
            "kernel: writev()"
        );
        assert_eq!(
            k("x;do_syscall_64_[k];exit_to_user_mode_loop_[k];schedule_[k]"),
            "kernel: scheduling at a system call's return"
        );
        assert_eq!(
            k("x;memcpy;asm_exc_page_fault_[k];clear_page_erms_[k]"),
            "kernel: page faults"
        );
        assert_eq!(
            k("x;f;asm_sysvec_apic_timer_interrupt_[k];y_[k]"),
            "kernel: interrupts"
        );
        assert_eq!(k("x;ret_from_fork_[k];kthread_[k]"), "kernel: other");
        assert_eq!(k("x;do_syscall_64_[k]"), "kernel: system call entry");
        assert_eq!(k("x;main;poll_read<T>"), "poll_read");
        let folded = "x;do_syscall_64_[k];__sys_connect_[k];__cgroup_bpf_run_filter_sock_addr_[k] 1\nx;y 3\n";
        assert_eq!(bpf_percent(folded), 25.0);
    }

    #[test]
    fn cpu_time_comes_from_proc_stat_fields_14_and_15() {
        let line = "42 (kube apiserver) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0";
        assert_eq!(
            parse_stat(line, 100.0),
            Some(("kube apiserver".into(), 3.0))
        );
        assert_eq!(parse_stat("42 (x", 100.0), None);
        let before = HashMap::from([(1, ("a".to_string(), 1.0)), (2, ("b".to_string(), 5.0))]);
        let after = HashMap::from([
            (1, ("a".to_string(), 3.0)),
            (2, ("b".to_string(), 5.001)),
            (3, ("a".to_string(), 1.0)),
            (4, ("kworker/0:1-mm_percpu_wq".to_string(), 0.5)),
            (5, ("kworker/u8:5-events".to_string(), 0.5)),
        ]);
        assert_eq!(
            cores_by_process(&before, &after, Duration::from_secs(2)),
            vec![("a".to_string(), 1.5), ("kworker".to_string(), 0.5)]
        );
    }

    #[test]
    fn the_flame_graph_is_an_svg_with_the_title() {
        let svg = flamegraph("ktctl;main;work 5\nktctl;main;idle 1\n", "bulk").unwrap();
        let svg = String::from_utf8(svg).unwrap();
        assert!(svg.starts_with("<?xml"), "{}", &svg[..80]);
        assert!(svg.contains(">bulk<"), "title missing");
    }
}
