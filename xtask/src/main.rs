//! `cargo xtask`: ktctl's chores.
//!
//! Layout: `setup` (what a fresh machine lacks), `testbed` (the test cluster), and the
//! commands that build on them (`ci`, `demo`, `e2e`, `bench`, `image`).

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
    /// Install what this machine lacks to build and test everything (idempotent).
    Setup,
    /// The testbed: a real Kubernetes control plane, pods as processes in network namespaces.
    Testbed {
        #[command(subcommand)]
        cmd: TestbedCmd,
    },
}

#[derive(Subcommand)]
enum TestbedCmd {
    /// Bring the testbed up (idempotent); prints the kubeconfig path.
    Up {
        #[arg(long, default_value_t = 1)]
        nodes: u8,
    },
    /// Stop every process and remove every namespace, veth, mount and cgroup it made.
    Down,
    /// Show the testbed's processes, nodes and pods.
    Status,
    /// Run CMD in a machine (`laptop`, `node`, `node-N`) with KUBECONFIG, KT_CGROUP and PATH set.
    Exec {
        machine: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
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
        Cmd::Setup => setup::run().map(|()| ExitCode::SUCCESS),
        Cmd::Testbed { cmd } => {
            let tb = Testbed::default();
            match cmd {
                TestbedCmd::Up { nodes } => tb.up(UpOptions { nodes })?,
                TestbedCmd::Down => tb.down()?,
                TestbedCmd::Status => print!("{}", tb.status()?),
                TestbedCmd::Exec { machine, cmd } => {
                    let Some(m) = Machine::parse(&machine) else {
                        eprintln!("xtask: unknown machine {machine:?} (laptop, node, node-N)");
                        return Ok(ExitCode::from(2));
                    };
                    let code = tb.exec(m, &cmd)?;
                    return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
