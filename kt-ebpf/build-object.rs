// Included by the build.rs of kt-ebpf's consumers (kt-userspace, router): builds one of
// kt-ebpf's objects, by its feature, for the BPF target with aya-build, and leaves it in
// OUT_DIR for `include_bytes_aligned!`. The BPF target is tier 3: core is built from source,
// which stable rustc allows with RUSTC_BOOTSTRAP=1 (and the rust-src component;
// `cargo xtask setup`).

/// Builds the object of kt-ebpf's `feature` (a bin of that name's feature; nothing else).
fn build_object(feature: &str) -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../kt-ebpf");
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
            features: &[feature],
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
