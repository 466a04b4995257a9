//! Ctrl-C, SIGTERM, SIGHUP and SIGQUIT, and the removal of the command's pid file (as
//! kt-connect's scripts stop it), counted from the moment a command starts to change the
//! cluster, so that a signal at any moment (while the shadow schedules, while the
//! port-forward comes up, during `diagnose`, during the cleanup itself) is seen by whoever is
//! waiting then, and none is lost between two waits.

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::pidfile::PidFile;

/// The signals that end a command (after its cleanup).
const ENDING: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// Unblocks `signals` in this thread (the runtime's, where they are then taken). A signal mask
/// survives exec: a parent that blocked them (a supervisor that passes signals on, and many
/// a test harness) would otherwise leave every Ctrl-C pending in ktctl forever, and its session
/// would never be cleaned up.
fn unblock(signals: &[libc::c_int]) -> std::io::Result<()> {
    // SAFETY: a sigset_t we own, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above; pthread_sigmask changes this thread's mask only.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        for &sig in signals {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// The "signal" of a removed pid file.
pub const PID_FILE_REMOVED: i32 = -1;
/// How often the pid file is looked at.
const PID_FILE_POLL: Duration = Duration::from_millis(500);

/// Signals received so far: how many, and the last one.
#[derive(Clone)]
pub struct Interrupts {
    rx: watch::Receiver<(u64, i32)>,
    /// Removed when the last clone is dropped (the command has ended).
    _pid_file: Option<Arc<PidFile>>,
}

impl Interrupts {
    /// Starts listening for SIGINT, SIGTERM, SIGHUP and SIGQUIT (from now on they no longer
    /// end the process by themselves), and writes `command`'s pid file, whose removal counts
    /// as a signal. A pid file that cannot be written is a warning, not a failure.
    pub fn install(command: &str) -> std::io::Result<Interrupts> {
        unblock(&ENDING)?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut quit = signal(SignalKind::quit())?;
        let (tx, rx) = watch::channel((0u64, 0));
        let tx = Arc::new(tx);
        let raise = move |tx: &watch::Sender<(u64, i32)>, sig| {
            tx.send_modify(|(n, last)| {
                *n += 1;
                *last = sig;
            })
        };
        let pid_file = match PidFile::create(command) {
            Ok(f) => Some(Arc::new(f)),
            Err(e) => {
                tracing::warn!(dir = %crate::pidfile::dir().display(), error = %e, "cannot write the pid file; `ktctl stop` will not see this process");
                None
            }
        };
        if let Some(f) = &pid_file {
            let path = f.path().to_path_buf();
            let tx = tx.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(PID_FILE_POLL).await;
                    if tx.is_closed() {
                        return;
                    }
                    if !path.exists() {
                        tracing::debug!(path = %path.display(), "pid file removed");
                        raise(&tx, PID_FILE_REMOVED);
                        return;
                    }
                }
            });
        }
        tokio::spawn(async move {
            loop {
                let sig = tokio::select! {
                    Some(()) = int.recv() => libc::SIGINT,
                    Some(()) = term.recv() => libc::SIGTERM,
                    Some(()) = hup.recv() => libc::SIGHUP,
                    Some(()) = quit.recv() => libc::SIGQUIT,
                    else => return,
                };
                raise(&tx, sig);
            }
        });
        Ok(Interrupts {
            rx,
            _pid_file: pid_file,
        })
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
        libc::SIGQUIT => "Quit",
        PID_FILE_REMOVED => "Stopped (pid file removed)",
        _ => "Signalled",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `sig` is blocked in this thread.
    fn blocked(sig: libc::c_int) -> bool {
        // SAFETY: pthread_sigmask only reads this thread's mask into a set we own.
        unsafe {
            let mut now: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut now);
            libc::sigismember(&now, sig) == 1
        }
    }

    #[test]
    fn ending_signals_a_parent_left_blocked_are_unblocked_and_no_others() {
        // On a thread of its own, as a parent's mask would be on ktctl's main thread.
        std::thread::spawn(|| {
            // SAFETY: a set we own; pthread_sigmask changes this thread's mask only.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1] {
                    libc::sigaddset(&mut set, sig);
                }
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            }
            assert!(blocked(libc::SIGINT));
            unblock(&ENDING).unwrap();
            for sig in ENDING {
                assert!(!blocked(sig), "signal {sig} still blocked");
            }
            assert!(
                blocked(libc::SIGUSR1),
                "a signal ktctl does not take stays as it was"
            );
        })
        .join()
        .unwrap();
    }
}
