use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use ktctl::cli::{Cli, Command};
use ktctl::error::Error;

fn main() -> ExitCode {
    kt_common::tunnel::keep_freed_heap();
    // ~/.kt/config gives the flags' defaults; a flag on the command line wins.
    let (command, notes) = match ktctl::config::load() {
        Ok(cfg) => ktctl::config::apply(Cli::command(), &cfg),
        Err(e) => (
            Cli::command(),
            vec![format!("{e}; going on with the built-in defaults")],
        ),
    };
    let cli = match Cli::from_arg_matches(&command.get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    ktctl::logging::init(cli.global.verbose.max(u8::from(cli.global.debug)));
    for n in notes {
        tracing::warn!("{n}");
    }
    if let Err(e) = kt_common::tunnel::raise_nofile_limit() {
        tracing::warn!(error = %e, "cannot raise the open files limit");
    }
    // Local commands: no runtime, no cluster.
    let local = match &cli.command {
        Command::Status(args) => Some(ktctl::cmd::status::status(args)),
        Command::Stop(args) => Some(ktctl::cmd::status::stop(args)),
        Command::Config(args) => Some(ktctl::cmd::config::run(args)),
        _ => None,
    };
    if let Some(result) = local {
        return exit(result);
    }
    if let Command::Completion { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "ktctl", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    // One thread: every stream of the tunnel passes through its multiplexer's task, so with
    // several workers each hand-off between that task and a connection's task is a wakeup
    // across threads (a futex and a context switch). Measured on the testbed at ~3k new
    // connections/s: about 20% less CPU per connection in ktctl on one thread, with the same
    // latency and bulk throughput.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ktctl: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async {
        match &cli.command {
            Command::Connect(args) => ktctl::cmd::connect::run(&cli.global, args).await,
            Command::Exchange(args) => ktctl::cmd::exchange::run(&cli.global, args).await,
            Command::Mesh(args) => ktctl::cmd::mesh::run(&cli.global, args).await,
            Command::Preview(args) => ktctl::cmd::preview::run(&cli.global, args).await,
            Command::Forward(args) => ktctl::cmd::forward::run(&cli.global, args).await,
            Command::Recover(args) => ktctl::cmd::recover::run(&cli.global, args).await,
            Command::Clean(args) => ktctl::cmd::clean::run(&cli.global, args).await,
            Command::Birdseye(args) => ktctl::cmd::birdseye::run(&cli.global, args).await,
            Command::Diagnose(args) => ktctl::cmd::diagnose::run(&cli.global, args).await,
            Command::Completion { .. }
            | Command::Status(_)
            | Command::Stop(_)
            | Command::Config(_) => Ok(0),
        }
    });
    // Detached tasks (watches, the tunnel) must not keep the process alive.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    exit(result)
}

fn exit(result: Result<u8, Error>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code),
        Err(Error::Reported(code)) => ExitCode::from(code),
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(e.exit_code())
        }
    }
}
