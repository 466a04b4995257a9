//! `cargo xtask setup`: makes a fresh Linux machine able to build and test everything.
//! Idempotent: each step checks first and takes well under a second when already done.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Debian packages the testbed, the e2e tests and the benchmarks use.
const DEBIAN_PACKAGES: &[&str] = &[
    "nginx-light",    // the nginx:* image
    "curl",           // curlimages/curl, probes, tests
    "iproute2",       // namespaces, veths, routes
    "nftables",       // kube-proxy (nftables mode)
    "iptables",       // kube-proxy fallback, kt-connect's shadow
    "conntrack",      // kube-proxy
    "openssh-server", // kt-connect's shadow image in the benchmark
    "ethtool",        // checksum offload in pods
    "socat",          // test clients
    "bpftool",        // inspecting attached programs in tests
    "wrk",            // benchmark load
    "linux-perf",     // benchmark profiles
    "util-linux",     // nsenter, unshare
    "procps",         // sysctl, ps
    "skopeo",         // checks the OCI image archive
    "openssl",        // e2e: a client without the session certificate
    "python3",        // e2e and root tests: socket clients
];

fn ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run_cmd(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("{what}: could not start"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn capture(cmd: &mut Command) -> Result<String> {
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("{:?} failed: {}", cmd, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    capture(Command::new("id").arg("-u")).is_ok_and(|s| s.trim() == "0")
}

pub fn run() -> Result<()> {
    debian_packages()?;
    rust_src()?;
    bpf_linker()?;
    cargo_fuzz()?;
    go_modules()?;
    eprintln!("setup: done");
    Ok(())
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !capture(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_ok_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "these Debian packages are missing and installing them needs root: {}",
            missing.join(" ")
        );
    }
    eprintln!("setup: installing {}", missing.join(" "));
    // Packages must not start their services (nginx, sshd) on this machine: a policy-rc.d that
    // says "no" for the duration of the install, removed afterwards unless one was there.
    let policy = PathBuf::from("/usr/sbin/policy-rc.d");
    let made_policy = !policy.exists();
    if made_policy {
        std::fs::write(&policy, "#!/bin/sh\nexit 101\n")?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o755))?;
    }
    let result = run_cmd(
        Command::new("apt-get").arg("update").arg("-qq"),
        "apt-get update",
    )
    .and_then(|_| {
        run_cmd(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
            "apt-get install",
        )
    });
    if made_policy {
        let _ = std::fs::remove_file(&policy);
    }
    result
}

/// The active toolchain's name (rustup sets RUSTUP_TOOLCHAIN for cargo's children).
fn toolchain() -> String {
    std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".into())
}

fn rust_src() -> Result<()> {
    let tc = toolchain();
    let installed = capture(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        &tc,
    ]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!(
        "setup: rustup component add rust-src ({tc}); the BPF target builds core from source"
    );
    run_cmd(
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", &tc]),
        "rustup component add rust-src",
    )
}

/// bpf-linker linked against the LLVM that rustc itself ships (no system libLLVM needed).
fn bpf_linker() -> Result<()> {
    if ok(Command::new("bpf-linker").arg("--version")) {
        return Ok(());
    }
    let vv = capture(Command::new("rustc").arg("-vV"))?;
    let llvm_major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc -vV shows no LLVM version")?
        .to_string();
    let sysroot =
        PathBuf::from(capture(Command::new("rustc").args(["--print", "sysroot"]))?.trim());
    let lib = sysroot.join("lib");
    let llvm = std::fs::read_dir(&lib)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM") && n.ends_with(".so"))
        .with_context(|| {
            format!(
                "no libLLVM*.so in {} (is this a rustup toolchain?)",
                lib.display()
            )
        })?;
    let link_name = llvm
        .trim_start_matches("lib")
        .trim_end_matches(".so")
        .to_string();
    eprintln!(
        "setup: building bpf-linker against rustc's LLVM {llvm_major} ({llvm}); a few minutes"
    );
    let rustflags = format!(
        "-L {lib} -l dylib={link_name} -C link-arg=-Wl,-rpath,{lib}",
        lib = lib.display()
    );
    run_cmd(
        Command::new("cargo")
            .args([
                "install",
                "--locked",
                "bpf-linker",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{llvm_major},no-llvm-linking"))
            .env("RUSTFLAGS", rustflags),
        "cargo install bpf-linker",
    )
}

fn cargo_fuzz() -> Result<()> {
    if ok(Command::new("cargo").args(["fuzz", "--version"])) {
        return Ok(());
    }
    eprintln!("setup: installing cargo-fuzz");
    run_cmd(
        Command::new("cargo").args(["install", "--locked", "cargo-fuzz"]),
        "cargo install cargo-fuzz",
    )
}

fn go_modules() -> Result<()> {
    if !ok(Command::new("go").arg("version")) {
        bail!(
            "Go is not installed; the testbed builds Kubernetes from its Go modules (install Go >= 1.26 from go.dev or Debian backports)"
        );
    }
    kt_testbed::gobuild::download_modules(&kt_testbed::cluster::Testbed::default().layout)
}
