//! Processes the benchmark runs in the testbed's laptop (and, through `kubectl exec`, in a
//! client pod): one-shot commands, background loads ended by their process group, and
//! long-running clients (ktctl, kubectl port-forward) stopped as a user would stop them.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kt_testbed::{Machine, Testbed, machine};

pub(crate) fn laptop(tb: &Testbed, args: &[&str]) -> Result<String> {
    let o = machine::output(&tb.layout, Machine::Laptop, args)?;
    if !o.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

pub(super) fn sh(tb: &Testbed, line: &str) -> Result<String> {
    laptop(tb, &["sh", "-c", line])
}

/// A shell line run as a process group of its own, in the laptop or in a pod; the whole group
/// is killed (by its id) when dropped.
pub(super) struct Group {
    child: Child,
    /// In a pod: how to reach it, and the file in the pod holding the group's id.
    pod: Option<(Testbed, String, String)>,
}

/// Tells apart the group-id files of the loads one benchmark starts in a pod.
static POD_LOADS: AtomicUsize = AtomicUsize::new(0);

impl Group {
    pub(super) fn start(tb: &Testbed, line: &str) -> Result<Group> {
        Group::spawn(tb, "sh", &["-c", line], None)
    }

    /// `line` in `pod`, under `setsid` so that it leads a process group there, whose id it
    /// writes to a file of the pod: ending the local `kubectl exec` would leave its children
    /// running (the testbed, as the kubelet does, kills only the exec'd process).
    pub(super) fn start_in_pod(tb: &Testbed, pod: &str, line: &str) -> Result<Group> {
        let n = POD_LOADS.fetch_add(1, Ordering::Relaxed);
        let file = format!("/tmp/kt-bench-load-{}-{n}.pgid", std::process::id());
        let inner = format!("echo $$ > {file}; {line}");
        Group::spawn(
            tb,
            "kubectl",
            &["exec", pod, "--", "setsid", "sh", "-c", &inner],
            Some((tb.clone(), pod.to_string(), file)),
        )
    }

    fn spawn(
        tb: &Testbed,
        program: &str,
        args: &[&str],
        pod: Option<(Testbed, String, String)>,
    ) -> Result<Group> {
        use std::os::unix::process::CommandExt;
        let mut cmd = machine::command(&tb.layout, Machine::Laptop, program)?;
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let child = cmd.spawn().context("starting a background group")?;
        Ok(Group { child, pod })
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Some((tb, pod, file)) = &self.pod {
            let kill =
                format!("p=$(cat {file} 2>/dev/null); [ -n \"$p\" ] && kill -9 -$p; rm -f {file}");
            if let Err(e) = laptop(tb, &["kubectl", "exec", pod, "--", "sh", "-c", &kill]) {
                eprintln!("bench: ending a load in pod {pod}: {e:#}");
            }
        }
        // SAFETY: kill(2) on the process group this process created (not yet reaped: its
        // leader's id cannot have been reused).
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Runs a shell line in the laptop when dropped (undoes a setting).
pub(super) struct Restore(pub(super) Testbed, pub(super) String);

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

    /// Ctrl-C, as a user ends it; its exit status once it has ended, `None` if it still runs
    /// after `within`.
    pub(crate) fn interrupt(&mut self, within: Duration) -> Option<ExitStatus> {
        // Once reaped its id may belong to another process: never signal it again.
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        // SAFETY: kill(2) on a child this process started and has not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let until = Instant::now() + within;
        while Instant::now() < until {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if self.interrupt(Duration::from_secs(20)).is_some() {
            return;
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
pub(super) fn with_output<T>(proc: &Bg, f: impl FnOnce() -> Result<T>) -> Result<T> {
    f().map_err(|e| e.context(format!("its output ended with:\n{}", proc.output())))
}
