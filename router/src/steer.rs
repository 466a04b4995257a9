//! The router's tc programs (kt-ebpf's `kt-tc` object, the only one this binary embeds) and
//! their maps: what `kt-router node` loads once per node and attaches to every pod's host-side
//! veth. See `kt_common::steer` for what the programs do and why they attach where they do.

use std::net::SocketAddrV4;

use anyhow::{Context, Result, anyhow};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::tc::SchedClassifierLinkId;
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
#[cfg(test)]
use kt_common::steer::{Flow, FlowKey};
use kt_common::steer::{SteerKey, SteerTarget, Timeouts, counter};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kt-tc"));

/// The program on the pod's packets (host-side ingress) and the one on packets to the pod.
const INGRESS: &str = "kt_tc_ingress";
const EGRESS: &str = "kt_tc_egress";

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

/// The tc programs, loaded (not yet attached), and their maps.
pub struct Steering {
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
            .context("loading the tc programs (needs CAP_BPF and CAP_NET_ADMIN)")?;
        for name in [INGRESS, EGRESS] {
            classifier(&mut ebpf, name)?
                .load()
                .with_context(|| format!("verifying {name}"))?;
        }
        Ok(Steering { ebpf })
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

fn steer_key(dst: SocketAddrV4, proto: Proto) -> SteerKey {
    SteerKey {
        addr: u32::from(*dst.ip()).to_be(),
        port: dst.port().to_be(),
        proto: proto.number(),
        pad: 0,
    }
}

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("{name} is not in the tc object"))?
        .try_into()
        .with_context(|| format!("{name} is not a tc program"))
}

#[cfg(test)]
mod tests;
