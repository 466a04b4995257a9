//! The testbed's long-running processes: started detached inside a machine, logged under
//! `target/testbed/logs`, remembered by pid and start time so that `down` ends exactly them.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::layout::{Layout, Machine};
use crate::machine::{Enter, machine_env};

/// A started process: its component name, pid and start time (clock ticks since boot).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Daemon {
    pub name: String,
    pub machine: Machine,
    pub pid: i32,
    pub start: u64,
}

/// The start time of a process, field 22 of /proc/PID/stat (None if it does not exist).
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after it follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Whether the process is gone or a zombie.
fn is_dead(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat.get(i + 2..i + 3))
            .is_none_or(|s| s == "Z"),
        Err(_) => true,
    }
}

impl Daemon {
    fn pid_file(layout: &Layout, machine: Machine, name: &str) -> PathBuf {
        layout.pids().join(format!("{}.{name}", machine.name()))
    }

    fn args_file(layout: &Layout, machine: Machine, name: &str) -> PathBuf {
        layout
            .state()
            .join("args")
            .join(format!("{}.{name}", machine.name()))
    }

    /// Starts the daemon `name` again with the arguments it was last started with.
    pub fn respawn(layout: &Layout, machine: Machine, name: &str) -> Result<Daemon> {
        let path = Daemon::args_file(layout, machine, name);
        let text = fs::read_to_string(&path).with_context(|| {
            format!("{name} in {machine} was never started ({})", path.display())
        })?;
        let args: Vec<String> = text.lines().map(str::to_string).collect();
        Daemon::spawn(layout, machine, name, &args)
    }

    pub fn log_file(layout: &Layout, machine: Machine, name: &str) -> PathBuf {
        layout.logs().join(format!("{}.{name}.log", machine.name()))
    }

    /// Whether this is still the process we started (not a reused pid).
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start) && !is_dead(self.pid)
    }

    /// Starts `args` detached inside `machine`.
    pub fn spawn(layout: &Layout, machine: Machine, name: &str, args: &[String]) -> Result<Daemon> {
        fs::create_dir_all(layout.logs())?;
        fs::create_dir_all(layout.pids())?;
        let args_path = Daemon::args_file(layout, machine, name);
        fs::create_dir_all(args_path.parent().expect("a folder"))?;
        fs::write(&args_path, args.join("\n"))?;
        let log_path = Daemon::log_file(layout, machine, name);
        let log = File::options().create(true).append(true).open(&log_path)?;
        let mut cmd = Command::new(&args[0]);
        cmd.args(&args[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        machine_env(layout, machine, &mut cmd)?;
        Enter::new(machine)?.apply(&mut cmd, true);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} in {machine}"))?;
        let pid = child.id() as i32;
        // Detached (its own session): dropping the handle neither waits nor kills; once this
        // process exits, init reaps it.
        drop(child);
        let start = start_time(pid)
            .with_context(|| format!("{name} exited at once; see {}", log_path.display()))?;
        let d = Daemon {
            name: name.to_string(),
            machine,
            pid,
            start,
        };
        fs::write(
            Daemon::pid_file(layout, machine, name),
            format!("{pid} {start}\n"),
        )?;
        Ok(d)
    }

    /// Every daemon recorded under `target/testbed/state/pids`.
    pub fn recorded(layout: &Layout) -> Vec<Daemon> {
        let Ok(rd) = fs::read_dir(layout.pids()) else {
            return vec![];
        };
        let mut out = vec![];
        for e in rd.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            let Some((m, name)) = file.split_once('.') else {
                continue;
            };
            let Some(machine) = Machine::parse(m) else {
                continue;
            };
            let Ok(text) = fs::read_to_string(e.path()) else {
                continue;
            };
            let mut it = text.split_whitespace();
            let (Some(pid), Some(start)) = (
                it.next().and_then(|p| p.parse().ok()),
                it.next().and_then(|s| s.parse().ok()),
            ) else {
                continue;
            };
            out.push(Daemon {
                name: name.to_string(),
                machine,
                pid,
                start,
            });
        }
        out.sort_by(|a, b| (a.machine, &a.name).cmp(&(b.machine, &b.name)));
        out
    }

    /// The recorded daemon, if it is still running.
    pub fn running(layout: &Layout, machine: Machine, name: &str) -> Option<Daemon> {
        Daemon::recorded(layout)
            .into_iter()
            .find(|d| d.machine == machine && d.name == name && d.alive())
    }

    /// SIGTERM, then SIGKILL after `grace`; forgets the pid file.
    pub fn stop(&self, layout: &Layout, grace: Duration) {
        if self.alive() {
            // SAFETY: kill(2) on a pid we started and just checked by start time.
            unsafe { libc::kill(self.pid, libc::SIGTERM) };
            let until = Instant::now() + grace;
            while self.alive() && Instant::now() < until {
                sleep(Duration::from_millis(50));
            }
            if self.alive() {
                // SAFETY: as above.
                unsafe { libc::kill(self.pid, libc::SIGKILL) };
                let until = Instant::now() + Duration::from_secs(5);
                while self.alive() && Instant::now() < until {
                    sleep(Duration::from_millis(20));
                }
            }
        }
        let _ = fs::remove_file(Daemon::pid_file(layout, self.machine, &self.name));
    }

    /// Fails with the tail of the log if the process has ended.
    pub fn check(&self, layout: &Layout) -> Result<()> {
        if self.alive() {
            return Ok(());
        }
        bail!(
            "{} in {} exited; last lines of {}:\n{}",
            self.name,
            self.machine,
            Daemon::log_file(layout, self.machine, &self.name).display(),
            tail(&Daemon::log_file(layout, self.machine, &self.name), 25)
        )
    }
}

/// The last `n` lines of a file (for error messages).
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
