//! Ctrl-C, SIGTERM and SIGHUP, counted from the moment a command starts to change the
//! cluster, so that a signal at any moment (while the shadow schedules, while the
//! port-forward comes up, during `diagnose`, during the cleanup itself) is seen by whoever is
//! waiting then, and none is lost between two waits.

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// Signals received so far: how many, and the last one.
#[derive(Clone)]
pub struct Interrupts {
    rx: watch::Receiver<(u64, i32)>,
}

impl Interrupts {
    /// Starts listening for SIGINT, SIGTERM and SIGHUP (from now on they no longer end the
    /// process by themselves).
    pub fn install() -> std::io::Result<Interrupts> {
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        let (tx, rx) = watch::channel((0u64, 0));
        tokio::spawn(async move {
            loop {
                let sig = tokio::select! {
                    Some(()) = int.recv() => libc::SIGINT,
                    Some(()) = term.recv() => libc::SIGTERM,
                    Some(()) = hup.recv() => libc::SIGHUP,
                    else => return,
                };
                tx.send_modify(|(n, last)| {
                    *n += 1;
                    *last = sig;
                });
            }
        });
        Ok(Interrupts { rx })
    }

    /// How many signals have come so far (a mark for [`Interrupts::after`]).
    pub fn count(&self) -> u64 {
        self.rx.borrow().0
    }

    /// Waits for a signal after the first `seen`; returns the latest signal's number.
    pub async fn after(&self, seen: u64) -> i32 {
        let mut rx = self.rx.clone();
        loop {
            let (n, sig) = *rx.borrow_and_update();
            if n > seen {
                return sig;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

/// How ktctl says a signal came.
pub fn describe(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "Interrupted",
        libc::SIGTERM => "Terminated",
        libc::SIGHUP => "Hung up",
        _ => "Signalled",
    }
}
