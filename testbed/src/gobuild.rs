//! Builds the testbed's Go binaries, cached outside the work tree by a hash of their inputs,
//! so a second `up` (or a second clone) never rebuilds.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::layout::{KUBERNETES_VERSION, Layout};

/// The two binaries: the control plane (multi-call) and the node agent.
#[derive(Clone, Copy, Debug)]
pub enum GoBinary {
    Cluster,
    Node,
}

impl GoBinary {
    fn name(self) -> &'static str {
        match self {
            GoBinary::Cluster => "kt-cluster",
            GoBinary::Node => "kt-node",
        }
    }

    fn package(self) -> &'static str {
        match self {
            GoBinary::Cluster => "./cmd/kt-cluster",
            GoBinary::Node => "./cmd/kt-node",
        }
    }

    /// Source folders whose .go files are part of the cache key (go.mod and go.sum always are).
    fn source_dirs(self) -> &'static [&'static str] {
        match self {
            GoBinary::Cluster => &["cmd/kt-cluster"],
            GoBinary::Node => &["cmd/kt-node", "node"],
        }
    }

    fn ldflags(self) -> String {
        let v = KUBERNETES_VERSION;
        let minor = v.split('.').nth(1).unwrap_or("0");
        let mut flags = String::from("-s -w");
        for pkg in [
            "k8s.io/component-base/version",
            "k8s.io/client-go/pkg/version",
        ] {
            flags += &format!(
                " -X {pkg}.gitVersion={v} -X {pkg}.gitMajor=1 -X {pkg}.gitMinor={minor} -X {pkg}.gitTreeState=clean"
            );
        }
        flags
    }
}

/// The cache folder: `$KT_TESTBED_CACHE`, else `$XDG_CACHE_HOME/ktctl-testbed`, else
/// `~/.cache/ktctl-testbed`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KT_TESTBED_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache")
        });
    base.join("ktctl-testbed")
}

/// FNV-1a, enough for a cache key that must be stable across runs and Rust versions.
fn fnv(hash: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *hash ^= u64::from(*b);
        *hash = hash.wrapping_mul(0x100_0000_01b3);
    }
}

fn cache_key(src: &Path, bin: GoBinary) -> Result<String> {
    let mut files = vec![src.join("go.mod"), src.join("go.sum")];
    for dir in bin.source_dirs() {
        let mut found: Vec<PathBuf> = fs::read_dir(src.join(dir))
            .with_context(|| format!("reading {}", src.join(dir).display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "go"))
            .filter(|p| !p.to_string_lossy().ends_with("_test.go"))
            .collect();
        found.sort();
        files.extend(found);
    }
    let mut h = 0xcbf2_9ce4_8422_2325_u64;
    fnv(&mut h, bin.ldflags().as_bytes());
    for f in files {
        fnv(
            &mut h,
            f.strip_prefix(src)
                .unwrap_or(&f)
                .to_string_lossy()
                .as_bytes(),
        );
        fnv(
            &mut h,
            &fs::read(&f).with_context(|| format!("reading {}", f.display()))?,
        );
    }
    Ok(format!("{h:016x}"))
}

/// Returns the cached binary, building it first if its inputs changed.
pub fn ensure(layout: &Layout, bin: GoBinary) -> Result<PathBuf> {
    let src = layout.testbed_src();
    let key = cache_key(&src, bin)?;
    let dir = cache_dir().join(format!("{}-{key}", bin.name()));
    let out = dir.join(bin.name());
    if out.is_file() {
        return Ok(out);
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let what = match bin {
        GoBinary::Cluster => format!(
            "kt-cluster (Kubernetes {KUBERNETES_VERSION}, etcd, CoreDNS; a cold build takes 7-10 minutes on 2 cores)"
        ),
        GoBinary::Node => "kt-node (the testbed's node agent)".to_string(),
    };
    eprintln!("testbed: building {what}");
    let started = Instant::now();
    let tmp = dir.join(format!("{}.tmp", bin.name()));
    let status = Command::new("go")
        .current_dir(&src)
        .args(["build", "-trimpath", "-ldflags", &bin.ldflags(), "-o"])
        .arg(&tmp)
        .arg(bin.package())
        .env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", "0")
        .status()
        .context("running `go build` (is Go installed? `cargo xtask setup` checks)")?;
    if !status.success() {
        bail!(
            "go build {} failed ({status}); see the output above",
            bin.package()
        );
    }
    fs::rename(&tmp, &out)?;
    eprintln!("testbed: built {} in {:.0?}", bin.name(), started.elapsed());
    Ok(out)
}

/// Downloads the Go modules (for `cargo xtask setup`), so a later build needs no network.
pub fn download_modules(layout: &Layout) -> Result<()> {
    let status = Command::new("go")
        .current_dir(layout.testbed_src())
        .args(["mod", "download"])
        .env("GOTOOLCHAIN", "local")
        .status()
        .context("running `go mod download`")?;
    if !status.success() {
        bail!("go mod download failed ({status})");
    }
    Ok(())
}

/// `go vet` over the testbed's Go code and `go test` of the node agent (for `cargo xtask ci`).
pub fn test(layout: &Layout) -> Result<()> {
    for args in [&["vet", "./..."][..], &["test", "./node/"][..]] {
        let status = Command::new("go")
            .current_dir(layout.testbed_src())
            .args(args)
            .env("GOTOOLCHAIN", "local")
            .env("CGO_ENABLED", "0")
            .status()
            .with_context(|| format!("running `go {}`", args.join(" ")))?;
        if !status.success() {
            bail!("go {} failed ({status})", args.join(" "));
        }
    }
    Ok(())
}
