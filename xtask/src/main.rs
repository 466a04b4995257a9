//! `cargo xtask`: ktctl's chores.
//!
//! Layout: [`setup`] (what a fresh machine lacks), `testbed` (the test cluster, from the
//! kt-testbed crate), [`build`] (binaries, linked into the testbed), [`ci`] (the whole suite),
//! [`demo`] (the seed walkthrough), [`image`] (the kt-router OCI image), [`bench`].

mod bench;
mod build;
mod ci;
mod demo;
mod image;
mod manifests;
mod setup;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use kt_testbed::{Machine, Testbed, UpOptions};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "ktctl's development tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what this machine lacks to build and test everything (idempotent)
    Setup,
    /// The whole test suite, as CI runs it (setup, lints, unit, root, fuzz, e2e, bench smoke)
    Ci {
        /// Skip the lints (fmt, clippy)
        #[arg(long)]
        no_lint: bool,
    },
    /// The seed walkthrough on the testbed: nginx in the cluster, ktctl connect, curl by name
    Demo,
    /// The end-to-end tests on the testbed
    E2e {
        /// Only tests whose name contains this
        filter: Option<String>,
    },
    /// Build ktctl and kt-router and link them into the testbed
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build the kt-router OCI image archive (no container engine needed)
    Image,
    /// Print the router DaemonSet's manifests (deploy/router.yaml) for `kubectl apply -f -`
    Manifests {
        /// The kt-router image the nodes pull (default: kt-router:<version>, as `image` builds)
        #[arg(long)]
        image: Option<String>,
    },
    /// Measure every path side by side (ktctl, kubectl port-forward, raw, kt-connect)
    Bench(bench::Args),
    /// Measuring helpers the benchmark runs inside the testbed
    #[command(hide = true)]
    BenchTool {
        #[command(subcommand)]
        tool: bench::tool::Tool,
    },
    /// The testbed: a real Kubernetes control plane, pods as processes in network namespaces
    Testbed {
        #[command(subcommand)]
        cmd: TestbedCmd,
    },
}

#[derive(Subcommand)]
enum TestbedCmd {
    /// Bring the testbed up (idempotent); prints the kubeconfig path
    Up {
        #[arg(long, default_value_t = 1)]
        nodes: u8,
    },
    /// Stop every process and remove every namespace, veth, mount and cgroup it made
    Down,
    /// Show the testbed's processes, nodes and pods
    Status,
    /// Stop one control-plane component (e.g. `apiserver`), as an outage would
    Stop { component: String },
    /// Start a stopped component again and wait until it serves
    Start { component: String },
    /// Run CMD in a machine (`laptop`, `node`, `node-N`) with KUBECONFIG, KT_CGROUP and PATH set
    Exec {
        machine: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
}

/// `apiserver` -> `kube-apiserver`; full names pass through.
fn component_name(c: &str) -> String {
    match c {
        "apiserver" | "controller-manager" | "scheduler" => format!("kube-{c}"),
        other => other.to_string(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Setup => setup::run()?,
        Cmd::Ci { no_lint } => ci::run(!no_lint)?,
        Cmd::Demo => demo::run()?,
        Cmd::E2e { filter } => ci::e2e(filter.as_deref())?,
        Cmd::Build { release } => {
            build::binaries(release)?;
        }
        Cmd::Image => {
            let path = image::build()?;
            println!("{}", path.display());
        }
        Cmd::Manifests { image } => print!("{}", manifests::render(image.as_deref())?),
        Cmd::Bench(args) => bench::run(args)?,
        Cmd::BenchTool { tool } => bench::tool::run(tool)?,
        Cmd::Testbed { cmd } => {
            let tb = Testbed::default();
            match cmd {
                TestbedCmd::Up { nodes } => tb.up(UpOptions { nodes })?,
                TestbedCmd::Down => tb.down()?,
                TestbedCmd::Status => print!("{}", tb.status()?),
                TestbedCmd::Stop { component } => tb.stop_component(&component_name(&component))?,
                TestbedCmd::Start { component } => {
                    tb.start_component(&component_name(&component))?
                }
                TestbedCmd::Exec { machine, cmd } => {
                    let Some(m) = Machine::parse(&machine) else {
                        eprintln!("xtask: unknown machine {machine:?} (laptop, node, node-N)");
                        return Ok(ExitCode::from(2));
                    };
                    let code = tb.exec(m, &cmd)?;
                    return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
