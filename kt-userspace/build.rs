//! Builds kt-ebpf's `kt-laptop` object (feature `laptop`, so nothing else) for the BPF target with
//! aya-build and leaves it in OUT_DIR for `include_bytes_aligned!`. The BPF target is tier 3:
//! core is built from source, which stable rustc allows with RUSTC_BOOTSTRAP=1 (and the
//! rust-src component; `cargo xtask setup`).

use std::path::Path;

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kt-ebpf");
    let root = root.canonicalize()?;
    // The toolchain cargo runs under (rustup sets RUSTUP_TOOLCHAIN for its children).
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".to_string());
    // SAFETY: build scripts are single-threaded; aya-build reads this to add -Z build-std=core
    // and the nested cargo inherits it.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    println!(
        "cargo:rerun-if-changed={}",
        root.join("../kt-common/src").display()
    );
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "kt-ebpf",
            root_dir: root.to_str().expect("utf-8 path"),
            features: &["laptop"],
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
