//! The testbed: a real Kubernetes control plane on one Linux host, for ktctl's tests and
//! benchmarks. Never shipped.
//!
//! etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy, kubectl and
//! CoreDNS are built from their Go modules (`testbed/go.mod`, one multi-call binary
//! `kt-cluster`); the node agent `kt-node` (virtual-kubelet) runs each pod's containers as
//! processes in the pod's own network and mount namespaces. Every simulated machine is a
//! network namespace plus a cgroup v2 of its own:
//!
//! ```text
//! kt-laptop   192.168.50.100  the developer's machine: a route to the API server only
//!    |  (bridge ktbr0 in kt-fabric)
//! kt-node-N   192.168.50.1N   node 1 runs the control plane; each node kube-proxy and kt-node
//!    |  veth per pod, /32 routes, gateway 169.254.1.1
//! ktp-*       10.244.N.x      pods
//! ```
//!
//! Layout: [`layout`] (paths, addresses), [`gobuild`] (cached Go builds), [`pki`]
//! (certificates and kubeconfigs), [`machine`] (namespaces, cgroups, running commands in a
//! machine), [`daemon`] (the control plane's processes), [`cluster`] (up, down, status).

pub mod cluster;
pub mod daemon;
pub mod gobuild;
pub mod layout;
pub mod machine;
pub mod pki;

pub use cluster::{Testbed, UpOptions};
pub use layout::Machine;
