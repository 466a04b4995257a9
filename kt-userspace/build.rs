//! Builds kt-ebpf's `kt-laptop` object (the cgroup sock_addr hooks and sk_lookup).

include!("../kt-ebpf/build-object.rs");

fn main() -> anyhow::Result<()> {
    build_object("laptop")
}
