//! The kt-connect path: alibaba/kt-connect's own `ktctl connect` (tun2socks mode), given as a
//! binary (`--kt-connect`, `KT_CONNECT_BIN`), against its shadow image as the testbed runs it
//! (sshd with the key from kt-connect's ConfigMap, CoreDNS for its DNS: testbed/images.yaml).
//!
//! kt-connect edits /etc/resolv.conf and /etc/hosts and keeps its keys under $HOME/.kt, so it
//! runs in a mount namespace of its own where both files are private copies and $HOME is a
//! folder of the benchmark's: nothing of this machine's changes. Its TUN device, routes and
//! iptables rules live in the testbed's laptop namespace and go with its exit.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kt_testbed::Testbed;

use super::process::{Bg, bg, laptop};

/// The shadow image kt-connect v0.3.7 deploys by default (the testbed maps it).
pub const SHADOW_IMAGE: &str =
    "registry.cn-hangzhou.aliyuncs.com/rdc-incubator/kt-connect-shadow:v0.3.7";
/// kt-connect's label on its connect shadows.
pub const SHADOW_SELECTOR: &str = "kt-role=shadow-connect";

/// A kt-connect binary that answered `--version`.
pub struct KtConnect {
    pub bin: PathBuf,
    pub version: String,
}

/// The binary to measure, or why kt-connect is not measured.
/// The kt-connect release the benchmark compares with.
const WANTED: &str = "0.3.7";

pub fn locate(given: Option<&Path>) -> Result<KtConnect, String> {
    let Some(bin) = given else {
        return Err(format!(
            "no kt-connect binary was given (`--kt-connect PATH` or KT_CONNECT_BIN, a build of github.com/alibaba/kt-connect v0.3.7's cmd/ktctl). It is not built here because {}",
            module_unavailable()
        ));
    };
    let out = std::process::Command::new(bin)
        .arg("--version")
        .env("HOME", std::env::temp_dir())
        .output()
        .map_err(|e| format!("{} cannot be run: {e}", bin.display()))?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || !version.starts_with("ktctl version") {
        return Err(format!(
            "{} --version answered {:?} (exit {}), not kt-connect's \"ktctl version ...\"",
            bin.display(),
            version,
            out.status
        ));
    }
    let version = version
        .trim_start_matches("ktctl version")
        .trim()
        .to_string();
    // The figures are kt-connect v0.3.7's: another version is refused, not measured.
    if version.trim_start_matches('v') != WANTED {
        return Err(format!(
            "{} is kt-connect {version}; the benchmark measures v{WANTED} (build it from its tag: see `cargo xtask bench --help`)",
            bin.display()
        ));
    }
    Ok(KtConnect {
        bin: bin.to_path_buf(),
        version,
    })
}

/// What the Go module proxy says of kt-connect, in its own words.
fn module_unavailable() -> String {
    let o = std::process::Command::new("go")
        .args(["list", "-m", "-versions", "github.com/alibaba/kt-connect"])
        .env("GOTOOLCHAIN", "local")
        .output();
    let detail = match o {
        Ok(o) if o.status.success() => {
            return format!(
                "the Go module proxy lists it ({}), but building it is left to whoever runs the benchmark",
                String::from_utf8_lossy(&o.stdout).trim()
            );
        }
        Ok(o) => String::from_utf8_lossy(&o.stderr).trim().replace('\n', " "),
        Err(e) => e.to_string(),
    };
    format!(
        "the Go module proxy these machines reach does not serve it: `go list -m -versions github.com/alibaba/kt-connect` answered: {detail}"
    )
}

/// A running `ktctl connect` of kt-connect; stopping it (SIGINT, as Ctrl-C) lets it remove its
/// shadow, then the benchmark removes what it may have left.
pub struct Running {
    proc: Option<Bg>,
    tb: Testbed,
    // Dropped after the process has ended (fields drop after `drop`).
    _home: Home,
}

impl Running {
    pub fn proc(&self) -> &Bg {
        self.proc.as_ref().expect("running until dropped")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Bg's drop sends SIGINT and waits for the exit; then sweep what kt-connect left.
        drop(self.proc.take());
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            match laptop(
                &self.tb,
                &["kubectl", "get", "pod", "-l", SHADOW_SELECTOR, "-o", "name"],
            ) {
                Ok(s) if s.trim().is_empty() => break,
                Err(_) => break,
                Ok(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
        for kind in ["pod", "configmap"] {
            let _ = laptop(
                &self.tb,
                &[
                    "kubectl",
                    "delete",
                    kind,
                    "-l",
                    SHADOW_SELECTOR,
                    "--ignore-not-found",
                    "--wait=false",
                ],
            );
        }
    }
}

/// The folder kt-connect gets as $HOME and for its private resolv.conf and hosts; removed when
/// dropped.
struct Home(PathBuf);

impl Drop for Home {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts `ktctl connect` of kt-connect in the laptop and waits for its banner.
pub fn start(tb: &Testbed, k: &KtConnect, node_selector: &str) -> Result<(Running, Duration)> {
    let home = Home(tb.layout.target.join("bench/kt-connect-home"));
    let _ = std::fs::remove_dir_all(&home.0);
    std::fs::create_dir_all(&home.0).with_context(|| format!("creating {}", home.0.display()))?;
    // Private copies of the files kt-connect rewrites, bound over the originals in a mount
    // namespace that propagates nothing back.
    let script = r#"set -e
home="$1"; shift
cp /etc/resolv.conf "$home/resolv.conf"
cp /etc/hosts "$home/hosts"
mount --bind "$home/resolv.conf" /etc/resolv.conf
mount --bind "$home/hosts" /etc/hosts
export HOME="$home"
exec "$@""#;
    let home_s = home.0.to_str().context("non-UTF-8 target folder")?;
    let bin = k.bin.to_str().context("non-UTF-8 kt-connect path")?;
    let (proc, ready) = bg(
        tb,
        Path::new("unshare"),
        &[
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "kt-connect",
            home_s,
            bin,
            "connect",
            "--mode",
            "tun2socks",
            "--image",
            SHADOW_IMAGE,
            "--nodeSelector",
            node_selector,
        ],
        "All looks good",
        Duration::from_secs(120),
    )
    .context("starting kt-connect's ktctl connect")?;
    Ok((
        Running {
            proc: Some(proc),
            tb: tb.clone(),
            _home: home,
        },
        ready,
    ))
}
