//! Building the workspace's binaries and pointing the testbed at them.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use kt_testbed::Testbed;

/// Runs cargo with `args` in the workspace, failing on a non-zero exit.
pub fn cargo(args: &[&str]) -> Result<()> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(workspace())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

pub fn workspace() -> PathBuf {
    Testbed::default().layout.workspace
}

/// Builds ktctl and kt-router (debug, or release) and links them into the testbed's bin/.
pub fn binaries(release: bool) -> Result<PathBuf> {
    let mut args = vec![
        "build",
        "--quiet",
        "-p",
        "kt-userspace",
        "-p",
        "kt-router",
        "--bins",
    ];
    if release {
        args.push("--release");
    }
    cargo(&args)?;
    let tb = Testbed::default();
    let dir = tb
        .layout
        .target
        .join(if release { "release" } else { "debug" });
    tb.link_workspace_binaries(&dir)?;
    Ok(dir)
}
