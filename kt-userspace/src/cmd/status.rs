//! `ktctl status`: this machine's running ktctl processes, from their pid files and the
//! records beside them; and `ktctl stop`, which ends them as Ctrl-C would.

use std::time::{Duration, Instant};

use crate::cli::{OutputFormat, StatusArgs, StopArgs};
use crate::error::{EnvError, Error, Result};
use crate::pidfile::{self, Entry, Record};

/// One line of `ktctl status`.
#[derive(Debug, serde::Serialize)]
struct Line {
    pid: u32,
    command: String,
    /// false: the process has ended and left its file (`ktctl clean --localOnly`).
    running: bool,
    #[serde(flatten)]
    record: Option<Record>,
}

fn lines() -> Result<Vec<Line>> {
    let entries = pidfile::list()
        .map_err(|e| Error::io(format!("reading {}", pidfile::dir().display()), e))?;
    Ok(entries
        .iter()
        .map(|e| Line {
            pid: e.pid,
            command: e.command.clone(),
            running: pidfile::is_ktctl(e.pid),
            record: pidfile::read_record(e),
        })
        .collect())
}

pub fn status(args: &StatusArgs) -> Result<u8> {
    let lines = lines()?;
    if args.output == OutputFormat::Json {
        let json = serde_json::to_string_pretty(&lines).expect("serialisable");
        println!("{json}");
        return Ok(0);
    }
    if lines.is_empty() {
        println!("No ktctl is running on this machine");
        return Ok(0);
    }
    let rows: Vec<[String; 7]> = lines
        .iter()
        .map(|l| {
            let r = l.record.clone().unwrap_or_default();
            [
                l.pid.to_string(),
                if l.running {
                    l.command.clone()
                } else {
                    format!("{} (ended)", l.command)
                },
                r.context,
                r.namespace,
                r.since,
                r.session.unwrap_or_default(),
                r.changed.join(", "),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "PID",
                "COMMAND",
                "CONTEXT",
                "NAMESPACE",
                "SINCE",
                "SESSION",
                "CHANGED"
            ],
            &rows
        )
    );
    if lines.iter().any(|l| !l.running) {
        println!(
            "(ended: the process is gone and left its pid file; `ktctl clean --localOnly` removes it)"
        );
    }
    Ok(0)
}

/// Left-aligned columns, two spaces apart; the last column is not padded.
pub fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut width = header.map(str::len);
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == N {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

pub fn stop(args: &StopArgs) -> Result<u8> {
    let me = std::process::id();
    let running: Vec<Entry> = pidfile::list()
        .map_err(|e| Error::io(format!("reading {}", pidfile::dir().display()), e))?
        .into_iter()
        .filter(|e| e.pid != me && pidfile::is_ktctl(e.pid))
        .collect();
    let targets: Vec<Entry> = if args.all {
        running
    } else if args.pids.is_empty() {
        return Err(
            EnvError::new("give the pids to stop (`ktctl status` lists them), or --all").into(),
        );
    } else {
        let mut out = vec![];
        for pid in &args.pids {
            match running.iter().find(|e| e.pid == *pid) {
                Some(e) => out.push(e.clone()),
                None => {
                    return Err(EnvError::new(format!(
                        "pid {pid} is not a running ktctl of this machine (`ktctl status` lists them)"
                    ))
                    .into());
                }
            }
        }
        out
    };
    if targets.is_empty() {
        println!("No ktctl is running on this machine");
        return Ok(0);
    }
    for e in &targets {
        tracing::info!("Stopping {} (pid {})", e.command, e.pid);
        // SAFETY: kill(2) with a pid checked above to be a running ktctl.
        if unsafe { libc::kill(e.pid as i32, libc::SIGINT) } != 0 {
            let err = std::io::Error::last_os_error();
            return Err(Error::io(format!("signalling pid {}", e.pid), err));
        }
    }
    let timeout = Duration::from_secs(args.timeout);
    let start = Instant::now();
    let mut left: Vec<&Entry> = targets.iter().collect();
    while !left.is_empty() {
        left.retain(|e| {
            let alive = pidfile::is_ktctl(e.pid);
            if !alive {
                tracing::info!("Stopped {} (pid {})", e.command, e.pid);
            }
            alive
        });
        if left.is_empty() {
            break;
        }
        if start.elapsed() >= timeout {
            for e in &left {
                tracing::error!(
                    "{} (pid {}) is still cleaning up after {}s; `kill -INT {}` a second time ends its cleanup at once",
                    e.command,
                    e.pid,
                    args.timeout,
                    e.pid
                );
            }
            return Ok(1);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_their_columns_and_leave_the_last_unpadded() {
        let t = table(
            &["PID", "COMMAND", "CHANGED"],
            &[
                ["1".into(), "connect".into(), "pod/x".into()],
                ["12345".into(), "mesh".into(), String::new()],
            ],
        );
        assert_eq!(
            t,
            "PID    COMMAND  CHANGED\n1      connect  pod/x\n12345  mesh\n"
        );
    }
}
