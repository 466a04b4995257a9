//! Where the testbed keeps its files and which addresses its machines have.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// Kubernetes release the control plane is built from (testbed/go.mod pins it).
pub const KUBERNETES_VERSION: &str = "v1.37.2";
/// Service CIDR; the API server's Service is .1, cluster DNS .10.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
pub const CLUSTER_DNS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const POD_CIDR: &str = "10.244.0.0/16";
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// The machines' shared LAN (inside the fabric namespace only).
pub const LAN_PREFIX: u8 = 24;
pub const LAPTOP_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 100);
/// The laptop's own resolver (CoreDNS with a hosts table), as systemd-resolved's stub would be.
pub const LAPTOP_RESOLVER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 53);
/// Search domain of the laptop's resolv.conf, as a home router hands out.
pub const LAPTOP_SEARCH: &str = "lan";
pub const FABRIC_NS: &str = "kt-fabric";
pub const BRIDGE: &str = "ktbr0";
/// Prefix of the pods' network namespaces (made by the node agents).
pub const POD_NS_PREFIX: &str = "ktp-";
pub const MAX_NODES: u8 = 8;

/// A simulated machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Machine {
    Laptop,
    /// Node 1..=MAX_NODES; node 1 runs the control plane.
    Node(u8),
}

impl Machine {
    /// Name of its network namespace and cgroup.
    pub fn name(self) -> String {
        match self {
            Machine::Laptop => "kt-laptop".into(),
            Machine::Node(n) => format!("kt-node-{n}"),
        }
    }

    pub fn ip(self) -> Ipv4Addr {
        match self {
            Machine::Laptop => LAPTOP_IP,
            Machine::Node(n) => Ipv4Addr::new(192, 168, 50, 10 + n),
        }
    }

    /// The node's pod CIDR.
    pub fn pod_cidr(self) -> Option<String> {
        match self {
            Machine::Laptop => None,
            Machine::Node(n) => Some(format!("10.244.{n}.0/24")),
        }
    }

    /// Parses `laptop`, `node` (node 1) or `node-N`.
    pub fn parse(s: &str) -> Option<Machine> {
        match s {
            "laptop" | "kt-laptop" => Some(Machine::Laptop),
            "node" => Some(Machine::Node(1)),
            _ => {
                let n = s
                    .strip_prefix("kt-node-")
                    .or_else(|| s.strip_prefix("node-"))?;
                let n: u8 = n.parse().ok()?;
                (1..=MAX_NODES).contains(&n).then_some(Machine::Node(n))
            }
        }
    }
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// The API server's address: node 1.
pub fn api_server_ip() -> Ipv4Addr {
    Machine::Node(1).ip()
}

/// Paths of one testbed instance, all under `<target>/testbed`.
#[derive(Clone, Debug)]
pub struct Layout {
    pub workspace: PathBuf,
    pub target: PathBuf,
    pub dir: PathBuf,
}

impl Layout {
    /// The workspace this crate lives in, honouring CARGO_TARGET_DIR.
    pub fn from_workspace(workspace: &Path) -> Layout {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace.join("target"));
        let target = if target.is_absolute() {
            target
        } else {
            workspace.join(target)
        };
        Layout {
            workspace: workspace.to_path_buf(),
            dir: target.join("testbed"),
            target,
        }
    }

    /// The default: the workspace holding this crate.
    pub fn default_workspace() -> Layout {
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        Layout::from_workspace(here.parent().expect("testbed crate has a parent folder"))
    }

    pub fn testbed_src(&self) -> PathBuf {
        self.workspace.join("testbed")
    }
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }
    pub fn logs(&self) -> PathBuf {
        self.dir.join("logs")
    }
    pub fn pki(&self) -> PathBuf {
        self.dir.join("pki")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }
    pub fn pids(&self) -> PathBuf {
        self.state().join("pids")
    }
    /// A node's own bpf filesystem: what its pods see as the host's /sys/fs/bpf (the nodes
    /// share one machine; a real node has one of its own).
    pub fn bpffs(&self, m: Machine) -> PathBuf {
        self.state().join(format!("{}.bpf", m.name()))
    }
    /// ktctl's home in a machine (`KT_HOME`: its pid files and config), so that tests never
    /// touch the real machine's `~/.kt`.
    pub fn kt_home(&self, m: Machine) -> PathBuf {
        self.state().join("kt-home").join(m.name())
    }
    /// kubectl, the control plane's symlinks and the workspace's binaries (PATH in machines).
    pub fn bin(&self) -> PathBuf {
        self.dir.join("bin")
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("config")
    }
    /// resolv.conf of a machine, bind-mounted by `ip netns exec` and by [`crate::machine`].
    pub fn netns_etc(machine: Machine) -> PathBuf {
        PathBuf::from("/etc/netns").join(machine.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_names_round_trip() {
        for m in [Machine::Laptop, Machine::Node(1), Machine::Node(2)] {
            assert_eq!(Machine::parse(&m.name()), Some(m));
        }
        assert_eq!(Machine::parse("node"), Some(Machine::Node(1)));
        assert_eq!(Machine::parse("node-2"), Some(Machine::Node(2)));
        assert_eq!(Machine::parse("node-0"), None);
        assert_eq!(Machine::parse("node-99"), None);
        assert_eq!(Machine::parse("desktop"), None);
    }

    #[test]
    fn addresses_follow_the_plan() {
        assert_eq!(Machine::Node(2).ip(), Ipv4Addr::new(192, 168, 50, 12));
        assert_eq!(
            Machine::Node(2).pod_cidr().as_deref(),
            Some("10.244.2.0/24")
        );
        assert_eq!(Machine::Laptop.pod_cidr(), None);
    }
}
