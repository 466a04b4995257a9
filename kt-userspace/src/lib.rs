//! ktctl: reach a Kubernetes cluster from a Linux machine as if it were local.
//!
//! Layout:
//! - [`cli`]: flags; [`cmd`]: one module per command;
//! - [`preflight`], [`cgroup`]: what the machine must offer, and where hooks attach;
//! - [`bpf`]: loading and attaching kt-ebpf; [`cidr`]: which addresses are the cluster's and
//!   their loopback aliases;
//! - [`cluster`]: the Kubernetes API (client, permissions, sessions, the shadow pod);
//! - [`tunnel`]: the self-healing mTLS tunnel to the shadow;
//! - [`proxy`]: the local TCP and UDP proxy behind the hooks; [`dns`]: the DNS server;
//! - [`interrupt`]: signals, counted so that none is lost between two waits;
//! - [`logging`], [`progress`], [`error`].

pub mod bpf;
pub mod cgroup;
pub mod cidr;
pub mod cli;
pub mod cluster;
pub mod cmd;
pub mod config;
pub mod dns;
pub mod error;
pub mod interrupt;
pub mod logging;
pub mod pidfile;
pub mod preflight;
pub mod progress;
pub mod proxy;
pub mod tunnel;
