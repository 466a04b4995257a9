//! ktctl's errors and the exit codes they map to: 0 ok, 1 runtime failure, 2 usage or
//! environment error (bad flags, no root, no cgroup v2, unreadable kubeconfig, missing RBAC).

use std::fmt;

/// A problem with how ktctl was run or with this machine: the user must change something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvError(pub String);

impl EnvError {
    pub fn new(msg: impl Into<String>) -> EnvError {
        EnvError(msg.into())
    }
}

impl fmt::Display for EnvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EnvError {}

/// Every error a command can end with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Env(#[from] EnvError),
    #[error(transparent)]
    Bpf(#[from] crate::bpf::BpfError),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error(transparent)]
    Tunnel(#[from] kt_common::tunnel::TunnelError),
    #[error(transparent)]
    Plan(#[from] crate::cidr::PlanError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Runtime(String),
    /// A signal ended the command before its work was done.
    #[error("interrupted by signal {0}")]
    Interrupted(i32),
    /// Already reported to the user; only the exit code is left.
    #[error("(reported above)")]
    Reported(u8),
}

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Env(_) | Error::Plan(_) => 2,
            Error::Reported(code) => *code,
            Error::Cluster(c) if c.is_environment() => 2,
            _ => 1,
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
