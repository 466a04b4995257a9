//! `cargo xtask setup`: placeholder replaced below.
pub fn run() -> anyhow::Result<()> {
    Ok(())
}
