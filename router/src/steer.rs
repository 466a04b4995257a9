//! The router's tc programs (kt-ebpf's `kt-tc` object, the only one this binary embeds) and
//! their maps: what `kt-router node` loads once per node and attaches to every pod's host-side
//! veth, and its cgroup sock_addr programs for the node's own sockets, attached to the node's
//! root cgroup. See `kt_common::steer` for what the programs do and why they attach where they
//! do.

use std::net::SocketAddrV4;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use aya::maps::{Array, HashMap, MapData, MapType, PerCpuArray};
use aya::programs::cgroup_sock_addr::CgroupSockAddrLink;
use aya::programs::links::CgroupAttachMode;
use aya::programs::tc::SchedClassifierLinkId;
use aya::programs::{CgroupSockAddr, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use kt_common::steer::{
    AddrFilter, Flow, FlowKey, SockKey, SteerKey, SteerTarget, Timeouts, counter,
};

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

/// The flow maps, both directions: what [`Steering::sweep`] cleans, and what a router leaves
/// pinned for the next one on its node (a rollout, an eviction), so that connections steered
/// before the restart keep their shadow.
const FLOW_MAPS: [&str; 2] = ["KT_FLOWS_FWD", "KT_FLOWS_REV"];

/// bpffs's `statfs` magic.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The filesystem type (`statfs` magic) of `path`.
pub fn fs_magic(path: &Path) -> Result<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .context("a path with a NUL byte")?;
    // SAFETY: a plain C struct, for which all zeroes is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs into that struct, with a NUL-terminated path.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("reading {}", path.display()));
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libcs
    Ok(st.f_type as i64)
}

/// Makes `dir` ready to hold the flow maps' pins: a folder on a bpf filesystem, created if
/// missing. A pin left there that the programs cannot use (another layout or size: a router
/// of another version) is removed, so that a fresh map replaces it.
pub fn prepare_pins(dir: &Path) -> Result<()> {
    prepare_pins_for(dir, kt_common::steer::MAX_FLOWS)
}

fn prepare_pins_for(dir: &Path, max_flows: u32) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if fs_magic(dir)? != BPF_FS_MAGIC {
        anyhow::bail!(
            "{} is not on a bpf filesystem (mount one: mount -t bpf bpf /sys/fs/bpf)",
            dir.display()
        );
    }
    for name in FLOW_MAPS {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let fits = MapData::from_pin(&path).and_then(|m| m.info()).map(|i| {
            matches!(i.map_type(), Ok(MapType::LruHash))
                && i.key_size() as usize == std::mem::size_of::<FlowKey>()
                && i.value_size() as usize == std::mem::size_of::<Flow>()
                && i.max_entries() == max_flows
        });
        match fits {
            Ok(true) => {
                tracing::info!(map = name, pin = %path.display(), "taking over the flows an earlier router left")
            }
            Ok(false) | Err(_) => {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing the unusable pin {}", path.display()))?;
                tracing::warn!(map = name, pin = %path.display(), "an earlier router's flows do not fit these programs (another version); starting without them");
            }
        }
    }
    Ok(())
}

/// Removes the flow maps' pins from `dir`, and `dir` if that leaves it empty: what a router
/// that nobody follows on its node does when it stops. The maps go once no program or
/// process holds them.
pub fn unpin(dir: &Path) -> Result<()> {
    for name in FLOW_MAPS {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("removing {}", dir.join(name).display()));
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
    Ok(())
}

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

/// How the tc programs attach to an interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TcAttach {
    /// TCX links where the kernel has them (Linux >= 6.6), netlink filters on a clsact qdisc
    /// before.
    #[default]
    Auto,
    /// TCX links (Linux >= 6.6): they go with the router's process, however it ends.
    Tcx,
    /// Netlink filters on a clsact qdisc (any kernel): they outlive a killed router, so the
    /// next one removes its predecessor's before attaching.
    Netlink,
}

/// The programs, loaded (not yet attached), and their maps.
pub struct Steering {
    /// The sock_addr programs' links on the node's cgroup (dropping one detaches it).
    host: Vec<CgroupSockAddrLink>,
    ebpf: Ebpf,
    tc_attach: TcAttach,
    /// What the programs were told ([`Steering::set_timeouts`]), for [`Steering::sweep`].
    timeouts: Timeouts,
    /// Steering entries removed lately, and when: their bits stay in the address filter until
    /// a sweep after [`Steering::retire_after`], as a program run that found the entry just
    /// before its removal may still be adding its flow.
    retiring: Vec<(SteerKey, SteerTarget, std::time::Instant)>,
    retire_after: std::time::Duration,
}

/// How long a removed steering entry keeps its bits in the address filter (a program run
/// lasts microseconds).
const RETIRE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// What a [`Steering::sweep`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Live flow entries (both directions).
    pub live: usize,
    /// Expired entries removed.
    pub removed: usize,
    /// Whether the tc programs act (something is steered, or a flow lives).
    pub active: bool,
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
        Steering::load_with(None, None)
    }

    /// Loads the programs with the flow maps pinned in `dir` ([`prepare_pins`] first): the
    /// flows an earlier router left there are taken over, and stay there for the next one
    /// unless [`unpin`] removes them.
    pub fn load_pinned(dir: &Path) -> Result<Steering> {
        Steering::load_with(None, Some(dir))
    }

    /// Loads the programs; `max_flows` overrides the flow maps' capacity, `pins` is where
    /// they are pinned.
    fn load_with(max_flows: Option<u32>, pins: Option<&Path>) -> Result<Steering> {
        let mut loader = EbpfLoader::new();
        for name in FLOW_MAPS {
            if let Some(n) = max_flows {
                loader.map_max_entries(name, n);
            }
            if let Some(dir) = pins {
                loader.map_pin_path(name, dir.join(name));
            }
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
        Ok(Steering {
            host: vec![],
            ebpf,
            tc_attach: TcAttach::Auto,
            timeouts: Timeouts::default(),
            retiring: vec![],
            retire_after: RETIRE_AFTER,
        })
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

    /// How [`Steering::attach`] attaches (by default TCX where the kernel has it).
    pub fn set_tc_attach(&mut self, how: TcAttach) {
        self.tc_attach = how;
    }

    /// Attaches both programs to `iface` (see [`TcAttach`]).
    pub fn attach(&mut self, iface: &str) -> Result<Attached> {
        use aya::programs::links::LinkOrder;
        use aya::programs::tc::{NlOptions, TcAttachOptions};
        let netlink = match self.tc_attach {
            TcAttach::Auto => {
                use aya::util::KernelVersion;
                KernelVersion::current().is_ok_and(|v| v < KernelVersion::new(6, 6, 0))
            }
            TcAttach::Tcx => false,
            TcAttach::Netlink => true,
        };
        if netlink {
            // Adding it twice is harmless (EEXIST).
            let _ = aya::programs::tc::qdisc_add_clsact(iface);
            // A router killed before it could detach left its filters, which would run
            // before ours with maps nobody updates any more.
            for (kind, name) in [
                (TcAttachType::Ingress, INGRESS),
                (TcAttachType::Egress, EGRESS),
            ] {
                if aya::programs::tc::qdisc_detach_program(iface, kind, name).is_ok() {
                    tracing::info!(
                        iface,
                        program = name,
                        "removed a filter an earlier router left"
                    );
                }
            }
        }
        let options = || {
            if netlink {
                TcAttachOptions::Netlink(NlOptions::default())
            } else {
                TcAttachOptions::TcxOrder(LinkOrder::default())
            }
        };
        let ingress = classifier(&mut self.ebpf, INGRESS)?
            .attach_with_options(iface, TcAttachType::Ingress, options())
            .with_context(|| format!("attaching {INGRESS} to {iface}"))?;
        let egress = match classifier(&mut self.ebpf, EGRESS)?.attach_with_options(
            iface,
            TcAttachType::Egress,
            options(),
        ) {
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
        let key = steer_key(dst, proto);
        // The filter's bits and the programs on before the entry exists: a first packet must
        // not slip past it, nor its flow's next ones.
        let mut filter = self.filter()?;
        filter.set(key.addr, key.port);
        filter.set(target.addr, target.port);
        self.set_filter(filter)?;
        self.set_active(true)?;
        self.steers()?
            .insert(key, target, 0)
            .with_context(|| format!("steering {dst} to {to}"))
    }

    /// Stops steering new flows to `dst`; flows under way keep their shadow until they end.
    pub fn unsteer(&mut self, dst: SocketAddrV4, proto: Proto) -> Result<()> {
        let key = steer_key(dst, proto);
        if let Ok(target) = self.steers()?.get(&key, 0) {
            self.retiring.push((key, target, std::time::Instant::now()));
        }
        match self.steers()?.remove(&key) {
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
        self.timeouts = t;
        Ok(())
    }

    /// Turns the tc programs on or off (`KT_TC_ACTIVE`; see `kt_common::steer`).
    fn set_active(&mut self, on: bool) -> Result<()> {
        let map = self
            .ebpf
            .map_mut("KT_TC_ACTIVE")
            .context("no activity map")?;
        Array::<_, u32>::try_from(map)?.set(0, u32::from(on), 0)?;
        Ok(())
    }

    /// The address filter (`KT_TC_ADDRS`; see `kt_common::steer`).
    fn filter(&self) -> Result<AddrFilter> {
        let map = self.ebpf.map("KT_TC_ADDRS").context("no address filter")?;
        Ok(Array::<_, AddrFilter>::try_from(map)?.get(&0, 0)?)
    }

    fn set_filter(&mut self, f: AddrFilter) -> Result<()> {
        let map = self
            .ebpf
            .map_mut("KT_TC_ADDRS")
            .context("no address filter")?;
        Array::<_, AddrFilter>::try_from(map)?.set(0, f, 0)?;
        Ok(())
    }

    /// Whether the tc programs act now.
    #[cfg(test)]
    fn active(&self) -> Result<bool> {
        let map = self.ebpf.map("KT_TC_ACTIVE").context("no activity map")?;
        Ok(Array::<_, u32>::try_from(map)?.get(&0, 0)? != 0)
    }

    /// Removes the flow entries idle past their timeout (the programs only notice one when a
    /// packet of its flow comes), sets the address filter to what is steered and what the live
    /// flows use (bits of what is gone are cleared), and turns the tc programs off when
    /// nothing is steered and no flow lives, on when something is: run it periodically, and
    /// once after loading (flows taken over from an earlier router need the filter and the
    /// programs on).
    pub fn sweep(&mut self) -> Result<Swept> {
        let now = monotonic_ns()?;
        let mut swept = Swept::default();
        let mut filter = AddrFilter::default();
        for name in FLOW_MAPS {
            let map = self.ebpf.map_mut(name).context("no flow map")?;
            let mut flows = HashMap::<_, FlowKey, Flow>::try_from(map)?;
            let mut expired = vec![];
            for entry in flows.iter() {
                // An entry removed by the programs meanwhile ends nothing here.
                let Ok((key, flow)) = entry else { continue };
                let idle = self.timeouts.idle_ns(key.proto, flow.state);
                if now.saturating_sub(flow.seen_ns) > idle {
                    expired.push(key);
                } else {
                    swept.live += 1;
                    // Forward: the original destination; reverse: the shadow.
                    filter.set(key.peer, key.peer_port);
                }
            }
            for key in expired {
                if flows.remove(&key).is_ok() {
                    swept.removed += 1;
                }
            }
        }
        let mut steering = false;
        for entry in self.steers()?.iter() {
            let Ok((key, target)) = entry else { continue };
            steering = true;
            filter.set(key.addr, key.port);
            filter.set(target.addr, target.port);
        }
        let after = self.retire_after;
        self.retiring.retain(|(_, _, at)| at.elapsed() < after);
        for (key, target, _) in &self.retiring {
            filter.set(key.addr, key.port);
            filter.set(target.addr, target.port);
        }
        self.set_filter(filter)?;
        swept.active = steering || swept.live > 0;
        self.set_active(swept.active)?;
        Ok(swept)
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

/// A read handle on the maps that know where a steered connection was going, for tasks
/// outside the loop that owns [`Steering`] (the node's mesh proxies): the reverse flow map
/// (pods' connections, rewritten by the tc programs) and the sock_addr programs' per-socket
/// records (the node's own connections).
pub struct FlowReader {
    flows: HashMap<MapData, FlowKey, Flow>,
    sockets: HashMap<MapData, SockKey, SteerTarget>,
}

/// A second handle on one of `ebpf`'s maps (a duplicate of its file descriptor: opening a map
/// by id would need CAP_SYS_ADMIN).
fn second_handle<K: aya::Pod, V: aya::Pod>(
    ebpf: &Ebpf,
    name: &str,
) -> Result<HashMap<MapData, K, V>> {
    use std::os::fd::AsFd;
    let (fd, lru) = match ebpf.map(name).with_context(|| format!("no map {name}"))? {
        aya::maps::Map::LruHashMap(d) => (d.fd().as_fd().try_clone_to_owned()?, true),
        aya::maps::Map::HashMap(d) => (d.fd().as_fd().try_clone_to_owned()?, false),
        _ => anyhow::bail!("{name} is not a hash map"),
    };
    let data = MapData::from_fd(fd).with_context(|| format!("a second handle on {name}"))?;
    let map = if lru {
        aya::maps::Map::LruHashMap(data)
    } else {
        aya::maps::Map::HashMap(data)
    };
    HashMap::try_from(map).with_context(|| format!("{name} as a hash map"))
}

impl Steering {
    /// A [`FlowReader`] on this steering's maps.
    pub fn flow_reader(&self) -> Result<FlowReader> {
        Ok(FlowReader {
            flows: second_handle(&self.ebpf, "KT_FLOWS_REV")?,
            sockets: second_handle(&self.ebpf, "KT_SOCK_ORIG")?,
        })
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
        let f = self.flows.get(&key, 0).ok()?;
        Some(SocketAddrV4::new(
            u32::from_be(f.addr).into(),
            u16::from_be(f.port),
        ))
    }

    /// The original destination of a TCP connection of this network namespace (the node's:
    /// a hostNetwork caller) from `client` that the sock_addr programs steered to `to`: its
    /// socket found by the kernel's socket diagnostics, its record by the socket's cookie.
    pub fn node_original(&self, client: SocketAddrV4, to: SocketAddrV4) -> Option<SocketAddrV4> {
        let cookie = match crate::sockdiag::tcp_cookie(client, to) {
            Ok(c) => c?,
            Err(e) => {
                tracing::debug!(%client, %to, error = %e, "no socket diagnostics for a node connection");
                return None;
            }
        };
        let key = SockKey {
            cookie,
            addr: u32::from(*to.ip()).to_be(),
            port: to.port().to_be(),
            proto: kt_common::steer::IPPROTO_TCP,
            pad: 0,
        };
        let o = self.sockets.get(&key, 0).ok()?;
        Some(SocketAddrV4::new(
            u32::from_be(o.addr).into(),
            u16::from_be(o.port),
        ))
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the programs' clock (`bpf_ktime_get_ns`).
fn monotonic_ns() -> Result<u64> {
    // SAFETY: a plain C struct, for which all zeroes is a valid value.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: clock_gettime into that struct.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return Err(std::io::Error::last_os_error()).context("reading CLOCK_MONOTONIC");
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
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
#[cfg(test)]
mod veth_tests;
