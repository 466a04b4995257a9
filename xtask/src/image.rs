//! `cargo xtask image`: the kt-router image as an OCI archive, built without a container
//! engine: a static binary in one layer. The archive is an OCI image layout (skopeo, podman,
//! `ctr import`) that also carries a `manifest.json` (docker load).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::build::workspace;

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn sha(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// Whether an ELF file has no program interpreter (is statically linked).
fn is_static(elf: &[u8]) -> bool {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 {
        return false;
    }
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let phentsize = u16::from_le_bytes([elf[0x36], elf[0x37]]) as usize;
    let phnum = u16::from_le_bytes([elf[0x38], elf[0x39]]) as usize;
    (0..phnum).all(|i| {
        let off = phoff + i * phentsize;
        elf.get(off..off + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().expect("4 bytes")) != 3)
    })
}

/// The static kt-router binary.
fn static_binary() -> Result<PathBuf> {
    let ws = workspace();
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "kt-router",
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .current_dir(&ws)
        .status()
        .context("building kt-router")?;
    if !status.success() {
        bail!("building the static kt-router failed ({status})");
    }
    let bin = ws.join("target/x86_64-unknown-linux-gnu/release/kt-router");
    if !is_static(&std::fs::read(&bin)?) {
        bail!("{} is not statically linked", bin.display());
    }
    Ok(bin)
}

/// A tar entry for a file of `data` at `path` with `mode`.
fn append(
    t: &mut tar::Builder<impl Write>,
    path: &str,
    data: &[u8],
    mode: u32,
    kind: tar::EntryType,
) -> Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    t.append_data(&mut h, path, data)?;
    Ok(())
}

/// Builds `target/image/kt-router-<version>.oci.tar` and returns its path.
pub fn build() -> Result<PathBuf> {
    let bin = std::fs::read(static_binary()?)?;
    // The layer: / with the binary, a /tmp and the CA bundle folder left empty.
    let mut layer_tar = tar::Builder::new(Vec::new());
    append(
        &mut layer_tar,
        "kt-router",
        &bin,
        0o755,
        tar::EntryType::Regular,
    )?;
    append(
        &mut layer_tar,
        "tmp/",
        &[],
        0o1777,
        tar::EntryType::Directory,
    )?;
    append(
        &mut layer_tar,
        "etc/passwd",
        b"root:x:0:0:root:/:/kt-router\nnobody:x:65534:65534:nobody:/:/kt-router\n",
        0o644,
        tar::EntryType::Regular,
    )?;
    let layer = layer_tar.into_inner()?;
    let diff_id = sha(&layer);
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(&layer)?;
    let layer_gz = gz.finish()?;
    let layer_digest = sha(&layer_gz);

    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["/kt-router"],
            "Env": ["PATH=/"],
            "Labels": {
                "org.opencontainers.image.title": "kt-router",
                "org.opencontainers.image.description": "ktctl's in-cluster agent (shadow, mesh router, node router)",
                "org.opencontainers.image.version": VERSION,
            }
        },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created_by": "cargo xtask image" }]
    }))?;
    let config_digest = sha(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer_gz.len() }]
    }))?;
    let manifest_digest = sha(&manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {
                "org.opencontainers.image.ref.name": VERSION,
                "io.containerd.image.name": format!("docker.io/library/kt-router:{VERSION}")
            }
        }]
    }))?;
    let blob = |d: &str| format!("blobs/sha256/{}", d.trim_start_matches("sha256:"));
    let docker = serde_json::to_vec(&json!([{
        "Config": blob(&config_digest),
        "RepoTags": [format!("kt-router:{VERSION}")],
        "Layers": [blob(&layer_digest)]
    }]))?;

    let dir = workspace().join("target/image");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("kt-router-{VERSION}.oci.tar"));
    let mut out = tar::Builder::new(std::fs::File::create(&path)?);
    append(
        &mut out,
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
        0o644,
        tar::EntryType::Regular,
    )?;
    append(
        &mut out,
        "index.json",
        &index,
        0o644,
        tar::EntryType::Regular,
    )?;
    append(
        &mut out,
        "manifest.json",
        &docker,
        0o644,
        tar::EntryType::Regular,
    )?;
    append(
        &mut out,
        &blob(&manifest_digest),
        &manifest,
        0o644,
        tar::EntryType::Regular,
    )?;
    append(
        &mut out,
        &blob(&config_digest),
        &config,
        0o644,
        tar::EntryType::Regular,
    )?;
    append(
        &mut out,
        &blob(&layer_digest),
        &layer_gz,
        0o644,
        tar::EntryType::Regular,
    )?;
    out.into_inner()?.flush()?;
    eprintln!(
        "image: {} ({} MiB, kt-router:{VERSION})",
        path.display(),
        std::fs::metadata(&path)?.len() >> 20
    );
    Ok(path)
}

/// Builds the archive and has skopeo (a real OCI tool) read and copy it.
pub fn build_and_check() -> Result<PathBuf> {
    let path = build()?;
    check_with_skopeo(&path)?;
    Ok(path)
}

fn check_with_skopeo(path: &Path) -> Result<()> {
    let src = format!("oci-archive:{}", path.display());
    let out = Command::new("skopeo")
        .args(["inspect", "--config", &src])
        .output()
        .context("running skopeo (cargo xtask setup installs it)")?;
    if !out.status.success() {
        bail!(
            "skopeo cannot read the image: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let cfg: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    if cfg["config"]["Entrypoint"] != json!(["/kt-router"]) {
        bail!("unexpected image config: {cfg}");
    }
    let dir = std::env::temp_dir().join(format!("kt-image-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let copied = Command::new("skopeo")
        .args(["copy", "--quiet", &src, &format!("dir:{}", dir.display())])
        .status()?;
    let _ = std::fs::remove_dir_all(&dir);
    if !copied.success() {
        bail!("skopeo copy of the image failed ({copied})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn elf_interpreter_detection() {
        // This test binary itself is dynamically linked (it has PT_INTERP).
        let me = std::fs::read(std::env::current_exe().expect("exe")).expect("read");
        assert!(!super::is_static(&me));
        assert!(!super::is_static(b"not an elf"));
    }
}
