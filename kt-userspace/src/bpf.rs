//! Loads kt-ebpf and attaches it: the cgroup sock_addr programs to a cgroup v2, sk_lookup to
//! this network namespace, and with `connect -- CMD` the guard to the parent of CMD's cgroup.
//! Every attachment is a bpf_link owned by this process, so the kernel detaches them all when
//! ktctl exits, however it exits.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use aya::maps::lpm_trie::Key;
use aya::maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, SockMap};
use aya::programs::cgroup_sock_addr::CgroupSockAddrLink;
use aya::programs::sk_lookup::SkLookupLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SkLookup};
use aya::{Ebpf, EbpfLoader};
use kt_common::bpf::{
    AliasTarget, CidrTarget, Config, DNS_SLOTS, FLAG_DNS, FLAG_REDIRECT, action, counter, sock,
};

use crate::cidr::Plan;

/// The compiled programs, embedded at build time.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kt-laptop"));

/// The cgroup programs, attached in this order (the ones that undo rewrites first, so that no
/// rewritten socket exists before its answers can be restored).
const CGROUP_PROGRAMS: &[&str] = &[
    "kt_recvmsg4",
    "kt_recvmsg6",
    "kt_getpeername4",
    "kt_getpeername6",
    "kt_sendmsg4",
    "kt_sendmsg6",
    "kt_connect4",
    "kt_connect6",
];

/// The guard's programs, attached to the parent of CMD's cgroup.
const GUARD_PROGRAMS: &[&str] = &[
    "kt_guard_connect4",
    "kt_guard_connect6",
    "kt_guard_sendmsg4",
    "kt_guard_sendmsg6",
];

/// Errors loading or attaching the programs.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("loading the eBPF object: {0}")]
    Object(#[source] aya::EbpfError),
    #[error(
        "eBPF program {name} failed to load (does this kernel support it? Linux >= 5.14 is needed): {source}"
    )]
    Load {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching {name} to {target}: {source}")]
    Attach {
        name: &'static str,
        target: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{0}")]
    Other(String),
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> BpfError {
    move |source| BpfError::Map { name, source }
}

/// What the hooks redirect and where to.
pub struct HookConfig<'a> {
    pub plan: &'a Plan,
    /// Resolvers whose DNS traffic goes to ktctl: index i is slot i + 1 (127.127.53.<i+1>).
    pub resolvers: &'a [Ipv4Addr],
    /// With `connect -- CMD` (the hooks on CMD's own cgroup): the cgroup given to ktctl, CMD's
    /// cgroup's parent. A guard there refuses every other task's connect()/sendmsg() to an
    /// alias, which sk_lookup would otherwise hand to the proxy. `None` when the hooks cover
    /// the whole cgroup given to ktctl.
    pub guard: Option<&'a Path>,
}

/// Attached programs; dropping this detaches everything.
pub struct Hooks {
    counters: PerCpuArray<MapData, u64>,
    _links: Vec<CgroupSockAddrLink>,
    _sk_lookup: SkLookupLink,
    _socks: SockMap<MapData>,
    logger: Option<tokio::task::JoinHandle<()>>,
    _ebpf: Ebpf,
}

impl Drop for Hooks {
    fn drop(&mut self) {
        if let Some(t) = self.logger.take() {
            t.abort();
        }
    }
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks").finish_non_exhaustive()
    }
}

/// Counters the programs keep (see `kt_common::bpf::counter`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub connect: u64,
    pub sendmsg: u64,
    pub dns: u64,
    pub own_sockets: u64,
    pub restored: u64,
    pub steered: u64,
    pub steer_misses: u64,
    pub denied: u64,
}

impl Hooks {
    /// Loads the programs, fills the maps, puts the proxy's sockets in the sock map, attaches
    /// the guard to `cfg.guard` if any, sk_lookup to `netns` and the sock_addr programs to
    /// `cgroup`. Only sockets in the network namespace of the proxy's `tcp` listener are
    /// rewritten (that namespace should be `netns`).
    pub fn attach(
        cgroup: &Path,
        netns: &File,
        cfg: &HookConfig<'_>,
        tcp: &impl AsRawFd,
        udp: &impl AsRawFd,
    ) -> Result<Hooks, BpfError> {
        bump_memlock();
        let mut ebpf = EbpfLoader::new().load(PROGRAMS).map_err(BpfError::Object)?;
        let logger = start_logger(&mut ebpf);

        let mut config: Array<_, Config> = Array::try_from(
            ebpf.take_map("KT_CONFIG")
                .ok_or_else(|| missing("KT_CONFIG"))?,
        )
        .map_err(map_err("KT_CONFIG"))?;
        let flags = FLAG_REDIRECT
            | if cfg.resolvers.is_empty() {
                0
            } else {
                FLAG_DNS
            };
        let cmd_cgroup = match cfg.guard {
            Some(_) => std::fs::metadata(cgroup)
                .map_err(|e| BpfError::Other(format!("reading cgroup {}: {e}", cgroup.display())))?
                .ino(),
            None => 0,
        };
        config
            .set(
                0,
                Config {
                    netns_cookie: netns_cookie(tcp)?,
                    cmd_cgroup,
                    flags,
                    reserved: 0,
                },
                0,
            )
            .map_err(map_err("KT_CONFIG"))?;

        let mut cluster: LpmTrie<_, u32, CidrTarget> = LpmTrie::try_from(
            ebpf.take_map("CLUSTER_V4")
                .ok_or_else(|| missing("CLUSTER_V4"))?,
        )
        .map_err(map_err("CLUSTER_V4"))?;
        let mut alias: LpmTrie<_, u32, AliasTarget> = LpmTrie::try_from(
            ebpf.take_map("ALIAS_V4")
                .ok_or_else(|| missing("ALIAS_V4"))?,
        )
        .map_err(map_err("ALIAS_V4"))?;
        for r in &cfg.plan.routes {
            let (net, al) = (u32::from(r.net.network()), u32::from(r.alias.network()));
            let key = Key::new(u32::from(r.net.prefix_len()), net.to_be());
            cluster
                .insert(
                    &key,
                    CidrTarget {
                        net,
                        alias: al,
                        action: action::REDIRECT,
                    },
                    0,
                )
                .map_err(map_err("CLUSTER_V4"))?;
            let akey = Key::new(u32::from(r.alias.prefix_len()), al.to_be());
            alias
                .insert(&akey, AliasTarget { alias: al, net }, 0)
                .map_err(map_err("ALIAS_V4"))?;
        }
        for e in &cfg.plan.excluded {
            let net = u32::from(e.network());
            let key = Key::new(u32::from(e.prefix_len()), net.to_be());
            cluster
                .insert(
                    &key,
                    CidrTarget {
                        net,
                        alias: 0,
                        action: action::EXCLUDE,
                    },
                    0,
                )
                .map_err(map_err("CLUSTER_V4"))?;
        }

        if cfg.resolvers.len() >= DNS_SLOTS as usize {
            return Err(BpfError::Other(format!(
                "at most {} resolvers can be redirected",
                DNS_SLOTS - 1
            )));
        }
        let mut resolvers: HashMap<_, u32, u32> = HashMap::try_from(
            ebpf.take_map("RESOLVERS")
                .ok_or_else(|| missing("RESOLVERS"))?,
        )
        .map_err(map_err("RESOLVERS"))?;
        let mut slots: Array<_, u32> = Array::try_from(
            ebpf.take_map("RESOLVER_SLOTS")
                .ok_or_else(|| missing("RESOLVER_SLOTS"))?,
        )
        .map_err(map_err("RESOLVER_SLOTS"))?;
        for (i, ip) in cfg.resolvers.iter().enumerate() {
            let slot = i as u32 + 1;
            resolvers
                .insert(u32::from(*ip).to_be(), slot, 0)
                .map_err(map_err("RESOLVERS"))?;
            slots
                .set(slot, u32::from(*ip).to_be(), 0)
                .map_err(map_err("RESOLVER_SLOTS"))?;
        }

        let mut socks: SockMap<MapData> = SockMap::try_from(
            ebpf.take_map("PROXY_SOCKS")
                .ok_or_else(|| missing("PROXY_SOCKS"))?,
        )
        .map_err(map_err("PROXY_SOCKS"))?;
        socks
            .set(sock::TCP, tcp, 0)
            .map_err(map_err("PROXY_SOCKS"))?;
        socks
            .set(sock::UDP, udp, 0)
            .map_err(map_err("PROXY_SOCKS"))?;
        let counters: PerCpuArray<MapData, u64> = PerCpuArray::try_from(
            ebpf.take_map("KT_COUNTERS")
                .ok_or_else(|| missing("KT_COUNTERS"))?,
        )
        .map_err(map_err("KT_COUNTERS"))?;

        // The guard first: from the moment sk_lookup steers, no one outside CMD's cgroup may
        // reach an alias.
        let mut links = Vec::with_capacity(CGROUP_PROGRAMS.len() + GUARD_PROGRAMS.len());
        if let Some(parent) = cfg.guard {
            attach_cgroup(&mut ebpf, GUARD_PROGRAMS, parent, &mut links)?;
        }

        let lookup: &mut SkLookup = ebpf
            .program_mut("kt_sk_lookup")
            .ok_or_else(|| missing("kt_sk_lookup"))?
            .try_into()
            .map_err(|source| BpfError::Load {
                name: "kt_sk_lookup",
                source,
            })?;
        lookup.load().map_err(|source| BpfError::Load {
            name: "kt_sk_lookup",
            source,
        })?;
        let id = lookup.attach(netns).map_err(|source| BpfError::Attach {
            name: "kt_sk_lookup",
            target: "this network namespace".into(),
            source,
        })?;
        let sk_lookup = lookup.take_link(id).map_err(|source| BpfError::Attach {
            name: "kt_sk_lookup",
            target: "netns".into(),
            source,
        })?;

        attach_cgroup(&mut ebpf, CGROUP_PROGRAMS, cgroup, &mut links)?;
        tracing::debug!(cgroup = %cgroup.display(), programs = links.len(), "eBPF hooks attached");
        Ok(Hooks {
            counters,
            _links: links,
            _sk_lookup: sk_lookup,
            _socks: socks,
            logger,
            _ebpf: ebpf,
        })
    }

    /// Sums the per-CPU counters.
    pub fn counters(&self) -> Counters {
        let get = |i: u32| {
            self.counters
                .get(&i, 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0)
        };
        Counters {
            connect: get(counter::CONNECT),
            sendmsg: get(counter::SENDMSG),
            dns: get(counter::DNS),
            own_sockets: get(counter::SELF),
            restored: get(counter::RESTORE),
            steered: get(counter::LOOKUP),
            steer_misses: get(counter::LOOKUP_MISS),
            denied: get(counter::DENIED),
        }
    }
}

/// Loads `names` and attaches them to `cgroup`, appending their links to `links`.
fn attach_cgroup(
    ebpf: &mut Ebpf,
    names: &[&'static str],
    cgroup: &Path,
    links: &mut Vec<CgroupSockAddrLink>,
) -> Result<(), BpfError> {
    let cg = File::open(cgroup)
        .map_err(|e| BpfError::Other(format!("opening cgroup {}: {e}", cgroup.display())))?;
    for &name in names {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or_else(|| missing(name))?
            .try_into()
            .map_err(|source| BpfError::Load { name, source })?;
        prog.load()
            .map_err(|source| BpfError::Load { name, source })?;
        let target = cgroup.display().to_string();
        // A bpf_link on a cgroup is always multi-attach: the programs of a cgroup run before
        // those of its parents, so the guard sees what CMD's hooks wrote.
        let id = prog
            .attach(&cg, CgroupAttachMode::Single)
            .map_err(|source| BpfError::Attach {
                name,
                target: target.clone(),
                source,
            })?;
        links.push(prog.take_link(id).map_err(|source| BpfError::Attach {
            name,
            target,
            source,
        })?);
    }
    Ok(())
}

/// The cookie of the network namespace `sock` lives in (`SO_NETNS_COOKIE`, Linux >= 5.14).
fn netns_cookie(sock: &impl AsRawFd) -> Result<u64, BpfError> {
    // SAFETY: the descriptor stays open for this call (the caller holds the socket).
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(sock.as_raw_fd()) };
    kt_common::bpf::netns_cookie(fd).map_err(|e| {
        BpfError::Other(format!(
            "reading the network namespace's cookie (SO_NETNS_COOKIE needs Linux >= 5.14): {e}"
        ))
    })
}

fn missing(name: &str) -> BpfError {
    BpfError::Other(format!("the eBPF object has no {name} (build mismatch)"))
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
fn bump_memlock() {
    let rl = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rl) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK (fine on Linux >= 5.11)");
    }
}

/// Forwards the programs' aya-log records into `log`, which tracing picks up.
fn start_logger(ebpf: &mut Ebpf) -> Option<tokio::task::JoinHandle<()>> {
    let handle = tokio::runtime::Handle::try_current().ok()?;
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!(error = %e, "eBPF logging unavailable");
            return None;
        }
    };
    let _guard = handle.enter();
    // SAFETY: the logger owns its ring buffer's descriptor, which lives as long as it does.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .ok()?;
    Some(handle.spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}
