//! Builds kt-ebpf's `kt-tc` object (the node router's tc steering programs).

include!("../kt-ebpf/build-object.rs");

fn main() -> anyhow::Result<()> {
    build_object("tc")
}
