//! `cargo xtask ci`: the whole suite. Every step runs even when an earlier one failed (except
//! when the machine cannot build at all), the testbed always comes down, and a summary with
//! each step's time ends the run.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kt_testbed::{Testbed, UpOptions};

use crate::build::{binaries, cargo, workspace};

struct Steps {
    done: Vec<(String, Duration, bool)>,
}

impl Steps {
    fn run(&mut self, name: &str, f: impl FnOnce() -> Result<()>) -> bool {
        eprintln!("\n==> {name}");
        let start = Instant::now();
        let r = f();
        let ok = match &r {
            Ok(()) => true,
            Err(e) => {
                eprintln!("==> {name} FAILED: {e:#}");
                false
            }
        };
        self.done.push((name.to_string(), start.elapsed(), ok));
        ok
    }

    fn summary(&self) -> Result<()> {
        eprintln!("\n{:<40} {:>9}  result", "step", "time");
        let mut total = Duration::ZERO;
        for (name, d, ok) in &self.done {
            total += *d;
            eprintln!(
                "{name:<40} {:>8.0?}  {}",
                d,
                if *ok { "ok" } else { "FAILED" }
            );
        }
        eprintln!("{:<40} {:>8.0?}", "total", total);
        let failed: Vec<&str> = self
            .done
            .iter()
            .filter(|s| !s.2)
            .map(|s| s.0.as_str())
            .collect();
        if !failed.is_empty() {
            bail!("failed: {}", failed.join(", "));
        }
        Ok(())
    }
}

pub fn run(lint: bool) -> Result<()> {
    let mut s = Steps { done: vec![] };
    if !s.run("setup", crate::setup::run) {
        return s.summary();
    }
    if !s.run("build (debug)", || binaries(false).map(|_| ())) {
        return s.summary();
    }
    if lint {
        s.run("cargo fmt --check", || cargo(&["fmt", "--all", "--check"]));
        s.run("clippy -D warnings", || {
            cargo(&["clippy", "--quiet", "--all-targets", "--", "-D", "warnings"])
        });
        s.run("clippy -D warnings (eBPF crate)", clippy_ebpf);
    }
    s.run("unit tests", || {
        cargo(&[
            "test",
            "--quiet",
            "--workspace",
            "--exclude",
            "kt-ebpf",
            "--all-features",
        ])
    });
    s.run("root tests (eBPF hooks in a child cgroup)", || {
        cargo(&[
            "test",
            "--quiet",
            "-p",
            "kt-userspace",
            "--test",
            "hooks",
            "--",
            "--ignored",
            "--test-threads=1",
        ])
    });
    s.run(
        "root tests (the router's tc programs on crafted packets and real veths)",
        || {
            cargo(&[
                "test",
                "--quiet",
                "-p",
                "kt-router",
                "--bin",
                "kt-router",
                "--",
                "--ignored",
                "steer::",
            ])
        },
    );
    s.run("go vet, go test (the testbed's node agent)", || {
        kt_testbed::gobuild::test(&Testbed::default().layout)
    });
    s.run("fuzz the frame decoder (30 s)", fuzz);
    s.run("image (OCI archive, checked by skopeo)", || {
        crate::image::build_and_check().map(|_| ())
    });
    s.run("e2e on the testbed", || e2e(None));
    s.run("bench --quick (smoke; no thresholds)", || {
        crate::bench::run(crate::bench::Args::quick())
    });
    s.run("testbed down, nothing left behind", || {
        Testbed::default().down()
    });
    s.summary()
}

fn clippy_ebpf() -> Result<()> {
    let status = Command::new("cargo")
        .args([
            "clippy",
            "--quiet",
            "-p",
            "kt-ebpf",
            "--all-features",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ])
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_DIR", workspace().join("target/ebpf-clippy"))
        .current_dir(workspace())
        .status()
        .context("running clippy on kt-ebpf")?;
    if !status.success() {
        bail!("clippy on kt-ebpf failed ({status})");
    }
    Ok(())
}

fn fuzz() -> Result<()> {
    let status = Command::new("cargo")
        .args(["fuzz", "run", "frame_decoder", "--", "-max_total_time=30"])
        .env("RUSTC_BOOTSTRAP", "1")
        .current_dir(workspace().join("fuzz"))
        .status()
        .context("running cargo fuzz")?;
    if !status.success() {
        bail!("the fuzzer found a failing input ({status}); see fuzz/artifacts/");
    }
    Ok(())
}

/// Builds, brings the testbed up with two nodes and runs the e2e tests: ktctl's first, the
/// testbed's own last (it ends with `down` and checks that nothing is left).
pub fn e2e(filter: Option<&str>) -> Result<()> {
    binaries(false)?;
    Testbed::default().up(UpOptions { nodes: 2 })?;
    let mut failed = vec![];
    for test in ["connect", "faults", "inbound", "tools", "router", "testbed"] {
        let mut args = vec![
            "test",
            "--quiet",
            "-p",
            "kt-testbed",
            "--test",
            test,
            "--",
            "--ignored",
            "--test-threads=1",
        ];
        if let Some(f) = filter {
            args.push(f);
        }
        if let Err(e) = cargo(&args) {
            eprintln!("{e:#}");
            failed.push(test);
        }
    }
    if !failed.is_empty() {
        bail!("e2e failed: {}", failed.join(", "));
    }
    Ok(())
}
