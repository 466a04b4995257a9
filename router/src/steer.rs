//! The router's tc programs (kt-ebpf's `kt-tc` object, the only one this binary embeds) and
//! their maps: what `kt-router node` loads once per node and attaches to every pod's host-side
//! veth, and its cgroup sock_addr programs for the node's own sockets, attached to the node's
//! root cgroup. See `kt_common::steer` for what the programs do and why they attach where they
//! do.

use std::net::SocketAddrV4;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::cgroup_sock_addr::CgroupSockAddrLink;
use aya::programs::links::CgroupAttachMode;
use aya::programs::tc::SchedClassifierLinkId;
use aya::programs::{CgroupSockAddr, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use kt_common::steer::{Flow, FlowKey, SteerKey, SteerTarget, Timeouts, counter};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kt-tc"));

/// The program on the pod's packets (host-side ingress) and the one on packets to the pod.
const INGRESS: &str = "kt_tc_ingress";
const EGRESS: &str = "kt_tc_egress";
/// The sock_addr programs for the node's own sockets.
const HOST: [&str; 8] = [
    "kt_host_connect4",
    "kt_host_sendmsg4",
    "kt_host_recvmsg4",
    "kt_host_getpeername4",
    "kt_host_connect6",
    "kt_host_sendmsg6",
    "kt_host_recvmsg6",
    "kt_host_getpeername6",
];

/// A transport protocol that can be steered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn number(self) -> u8 {
        match self {
            Proto::Tcp => kt_common::steer::IPPROTO_TCP,
            Proto::Udp => kt_common::steer::IPPROTO_UDP,
        }
    }
}

/// The programs, loaded (not yet attached), and their maps.
pub struct Steering {
    /// The sock_addr programs' links on the node's cgroup (dropping one detaches it).
    host: Vec<CgroupSockAddrLink>,
    ebpf: Ebpf,
}

/// The two links of one interface.
#[derive(Debug)]
pub struct Attached {
    ingress: SchedClassifierLinkId,
    egress: SchedClassifierLinkId,
}

impl Steering {
    /// Loads the programs with the flow maps at their default size.
    pub fn load() -> Result<Steering> {
        Steering::load_with(None)
    }

    /// Loads the programs; `max_flows` overrides the flow maps' capacity.
    fn load_with(max_flows: Option<u32>) -> Result<Steering> {
        let mut loader = EbpfLoader::new();
        if let Some(n) = max_flows {
            loader
                .map_max_entries("KT_FLOWS_FWD", n)
                .map_max_entries("KT_FLOWS_REV", n);
        }
        let mut ebpf = loader
            .load(OBJECT)
            .context("loading the steering programs (needs CAP_BPF and CAP_NET_ADMIN)")?;
        for name in [INGRESS, EGRESS] {
            classifier(&mut ebpf, name)?
                .load()
                .with_context(|| format!("verifying {name}"))?;
        }
        for name in HOST {
            sock_addr(&mut ebpf, name)?
                .load()
                .with_context(|| format!("verifying {name}"))?;
        }
        Ok(Steering { host: vec![], ebpf })
    }

    /// Steers the node's own sockets too: attaches the sock_addr programs to `cgroup` (the
    /// node's root cgroup), acting on sockets in the network namespace whose cookie is
    /// `netns_cookie` (`kt_common::bpf::netns_cookie`). Needs Linux >= 5.8.
    pub fn attach_host(&mut self, cgroup: &Path, netns_cookie: u64) -> Result<()> {
        let map = self
            .ebpf
            .map_mut("KT_HOST_NETNS")
            .context("no host namespace map")?;
        Array::<_, u64>::try_from(map)?.set(0, netns_cookie, 0)?;
        let cg = std::fs::File::open(cgroup)
            .with_context(|| format!("opening the node's cgroup {}", cgroup.display()))?;
        for name in HOST {
            let prog = sock_addr(&mut self.ebpf, name)?;
            // A bpf_link on a cgroup is always multi-attach (the kernel wants no flags):
            // other programs on the node's cgroup stay, and run too.
            let id = prog
                .attach(&cg, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
            self.host.push(prog.take_link(id)?);
        }
        Ok(())
    }

    /// Leaves the sockets of tasks in the cgroup `dir` (not its children) alone.
    pub fn exempt_cgroup(&mut self, dir: &Path) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        // A cgroup v2 folder's inode number is the cgroup's id.
        let id = std::fs::metadata(dir)
            .with_context(|| format!("reading cgroup {}", dir.display()))?
            .ino();
        let map = self
            .ebpf
            .map_mut("KT_HOST_EXEMPT")
            .context("no exempt cgroup map")?;
        HashMap::<_, u64, u8>::try_from(map)?
            .insert(id, 1, 0)
            .with_context(|| format!("exempting cgroup {}", dir.display()))
    }

    /// Detaches the sock_addr programs from the node's cgroup.
    pub fn detach_host(&mut self) {
        self.host.clear();
    }

    /// Attaches both programs to `iface` (TCX links on Linux >= 6.6, a clsact qdisc before).
    pub fn attach(&mut self, iface: &str) -> Result<Attached> {
        use aya::util::KernelVersion;
        if KernelVersion::current().is_ok_and(|v| v < KernelVersion::new(6, 6, 0)) {
            // Adding it twice is harmless (EEXIST).
            let _ = aya::programs::tc::qdisc_add_clsact(iface);
        }
        let ingress = classifier(&mut self.ebpf, INGRESS)?
            .attach(iface, TcAttachType::Ingress)
            .with_context(|| format!("attaching {INGRESS} to {iface}"))?;
        let egress = match classifier(&mut self.ebpf, EGRESS)?.attach(iface, TcAttachType::Egress) {
            Ok(l) => l,
            Err(e) => {
                let _ = classifier(&mut self.ebpf, INGRESS)?.detach(ingress);
                return Err(e).with_context(|| format!("attaching {EGRESS} to {iface}"));
            }
        };
        Ok(Attached { ingress, egress })
    }

    /// Detaches both programs from an interface (gone already is fine: its links went with it).
    pub fn detach(&mut self, a: Attached) -> Result<()> {
        let i = classifier(&mut self.ebpf, INGRESS)?.detach(a.ingress);
        let e = classifier(&mut self.ebpf, EGRESS)?.detach(a.egress);
        i.and(e).context("detaching the tc programs")
    }

    /// Steers new flows to `dst` (`proto`) to `to`.
    pub fn steer(&mut self, dst: SocketAddrV4, proto: Proto, to: SocketAddrV4) -> Result<()> {
        let target = SteerTarget {
            addr: u32::from(*to.ip()).to_be(),
            port: to.port().to_be(),
            pad: 0,
        };
        self.steers()?
            .insert(steer_key(dst, proto), target, 0)
            .with_context(|| format!("steering {dst} to {to}"))
    }

    /// Stops steering new flows to `dst`; flows under way keep their shadow until they end.
    pub fn unsteer(&mut self, dst: SocketAddrV4, proto: Proto) -> Result<()> {
        match self.steers()?.remove(&steer_key(dst, proto)) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(())
            }
            Err(e) => Err(e).with_context(|| format!("unsteering {dst}")),
        }
    }

    /// Overrides the flows' idle timeouts (0 keeps a default).
    pub fn set_timeouts(&mut self, t: Timeouts) -> Result<()> {
        let map = self
            .ebpf
            .map_mut("KT_TC_TIMEOUTS")
            .context("no timeouts map")?;
        Array::<_, Timeouts>::try_from(map)?.set(0, t, 0)?;
        Ok(())
    }

    /// The counters (`kt_common::steer::counter`), summed over CPUs.
    pub fn counters(&self) -> Result<[u64; counter::COUNT as usize]> {
        let map = self.ebpf.map("KT_TC_COUNTERS").context("no counters map")?;
        let map = PerCpuArray::<_, u64>::try_from(map)?;
        let mut out = [0; counter::COUNT as usize];
        for (i, v) in out.iter_mut().enumerate() {
            *v = map.get(&(i as u32), 0)?.iter().sum();
        }
        Ok(out)
    }

    fn steers(&mut self) -> Result<HashMap<&mut MapData, SteerKey, SteerTarget>> {
        let map = self.ebpf.map_mut("KT_STEER").context("no steering map")?;
        Ok(HashMap::try_from(map)?)
    }

    /// One direction's flow map (`"KT_FLOWS_FWD"` or `"KT_FLOWS_REV"`).
    #[cfg(test)]
    fn flows(&self, name: &str) -> HashMap<&MapData, FlowKey, Flow> {
        HashMap::try_from(self.ebpf.map(name).expect("flow map")).expect("hash map")
    }
}

/// A read handle on the reverse flow map, for tasks outside the loop that owns [`Steering`]
/// (the node's mesh proxies): which original address a steered connection dialled.
pub struct FlowReader(HashMap<MapData, FlowKey, Flow>);

impl Steering {
    /// A second handle on the reverse flow map (a duplicate of its file descriptor: opening
    /// a map by id would need CAP_SYS_ADMIN).
    pub fn flow_reader(&self) -> Result<FlowReader> {
        use std::os::fd::AsFd;
        let fd = match self
            .ebpf
            .map("KT_FLOWS_REV")
            .context("no reverse flow map")?
        {
            aya::maps::Map::LruHashMap(d) => d.fd().as_fd().try_clone_to_owned()?,
            _ => anyhow::bail!("KT_FLOWS_REV is not an LRU hash map"),
        };
        let data = MapData::from_fd(fd).context("a second handle on the reverse flow map")?;
        let map = HashMap::try_from(aya::maps::Map::LruHashMap(data))
            .context("the reverse flow map as a hash map")?;
        Ok(FlowReader(map))
    }
}

impl FlowReader {
    /// The original destination of the TCP connection from `client` that the tc programs
    /// steered to `to`, while its flow is remembered.
    pub fn original(&self, client: SocketAddrV4, to: SocketAddrV4) -> Option<SocketAddrV4> {
        let key = FlowKey {
            client: u32::from(*client.ip()).to_be(),
            peer: u32::from(*to.ip()).to_be(),
            client_port: client.port().to_be(),
            peer_port: to.port().to_be(),
            proto: kt_common::steer::IPPROTO_TCP,
            pad: [0; 3],
        };
        let f = self.0.get(&key, 0).ok()?;
        Some(SocketAddrV4::new(
            u32::from_be(f.addr).into(),
            u16::from_be(f.port),
        ))
    }
}

fn steer_key(dst: SocketAddrV4, proto: Proto) -> SteerKey {
    SteerKey {
        addr: u32::from(*dst.ip()).to_be(),
        port: dst.port().to_be(),
        proto: proto.number(),
        pad: 0,
    }
}

fn sock_addr<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut CgroupSockAddr> {
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("{name} is not in the steering object"))?
        .try_into()
        .with_context(|| format!("{name} is not a sock_addr program"))
}

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("{name} is not in the steering object"))?
        .try_into()
        .with_context(|| format!("{name} is not a tc program"))
}

#[cfg(test)]
mod host_tests;
#[cfg(test)]
mod tests;
