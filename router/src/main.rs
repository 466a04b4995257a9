//! kt-router: ktctl's in-cluster agent. One image, one binary; each role is a subcommand.
//!
//! `kt-router shadow`: a developer's tunnel endpoint pod. It accepts ktctl's mutually
//! authenticated TLS connections (the session's client certificate only), serves the streams
//! ktctl opens (TCP and UDP to cluster addresses, DNS queries to the cluster's DNS, exposed
//! ports whose connections it opens back toward ktctl), and ends the session when ktctl has been
//! gone longer than the grace period.
//!
//! `kt-router mesh`: an HTTP header router in front of a Service that developers share. It
//! sends each request carrying a developer's header value to that developer, everything else
//! to the original pods, and gives the Service back its selector when no developer is left.
//!
//! `kt-router node`: the router DaemonSet. It steers the traffic of Services that developers
//! exchange with `--mode ebpf` to their shadows inside each node (tc programs on the pods'
//! veths), without changing the Services or their workloads.

mod expose;
mod mesh;
mod node;
mod policy;
mod restore;
mod shadow;
mod sockdiag;
mod steer;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kt-router", version, about = "ktctl's in-cluster agent")]
struct Cli {
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// A developer's tunnel endpoint (started by ktctl in a pod)
    Shadow(shadow::Args),
    /// An HTTP header router in front of a meshed Service (started by ktctl mesh)
    Mesh(mesh::Args),
    /// The router DaemonSet on each node: tc steering for `--mode ebpf` (deploy/router.yaml)
    Node(node::Args),
}

fn main() -> ExitCode {
    kt_common::tunnel::keep_freed_heap();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("KT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .init();
    match kt_common::tunnel::raise_nofile_limit() {
        Ok(n) => tracing::debug!(limit = n, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open files limit"),
    }
    // One thread: every stream of the tunnel passes through its multiplexer's task, so with
    // several workers each hand-off between that task and a connection's task is a wakeup
    // across threads (a futex and a context switch). Measured on the testbed at ~3k new
    // connections/s: about 20% less CPU per connection in the shadow on one thread, with the same
    // latency and bulk throughput.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kt-router: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let r = rt.block_on(async {
        match cli.role {
            Role::Shadow(args) => shadow::run(args).await,
            Role::Mesh(args) => mesh::run(args).await,
            Role::Node(args) => node::run(args).await,
        }
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "kt-router failed");
            ExitCode::from(1)
        }
    }
}
