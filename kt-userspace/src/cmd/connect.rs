//! `ktctl connect`: every program on this machine (or only `-- CMD`) reaches cluster Services
//! by name, ClusterIP and pod IP.
//!
//! Order matters: everything that can fail for the user's environment is checked before the
//! cluster is touched; every object created after the session's anchor is removed on the way
//! out, whether the command ends by Ctrl-C, by CMD's exit or by an error.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{AbortOnDrop, Signals};
use crate::bpf::{HookConfig, Hooks};
use crate::cgroup::{self, ChildCgroup};
use crate::cidr::Plan;
use crate::cli::{ConnectArgs, DnsMode, Global};
use crate::cluster::session::{self, Session};
use crate::cluster::{CONNECT_PERMISSIONS, Kube};
use crate::dns::{self, index::Index, names::Rules};
use crate::error::{EnvError, Error, Result};
use crate::interrupt::{self, Interrupts};
use crate::proxy::{self, OrigDst};
use crate::tunnel::Tunnel;
use ipnet::Ipv4Net;
use kt_common::bpf::DNS_ALIAS_NET;

/// The banner kt-connect users look for.
pub const BANNER: &str =
    "All looks good, now you can access to resources in the kubernetes cluster";

/// Runs the command; returns the process exit code (CMD's, with `-- CMD`).
pub async fn run(global: &Global, args: &ConnectArgs) -> Result<u8> {
    if args.share_shadow {
        return Err(EnvError::new(
            "--shareShadow is not supported: every ktctl session has a shadow of its own, whose TLS credentials only that session holds",
        )
        .into());
    }
    if let DnsMode::Hosts(_) = args.dns_mode {
        return Err(EnvError::new(
            "--dnsMode hosts: ktctl never edits /etc/hosts; it answers cluster names itself, to the programs it redirects (use --dnsMode localDNS, the default, or podDNS)",
        )
        .into());
    }
    compatibility_notes(args);
    crate::preflight::check()?;
    let mut shadow_opts = super::shadow_options(global)?;
    let attach_to = cgroup::target(args.cgroup.as_deref())?;
    cgroup::sweep_leftovers(&attach_to);
    // sk_lookup is network-namespace wide: two sessions' steering would collide.
    let _lock = NetnsLock::acquire()?;

    let kube = super::connect_kube(global).await?;
    kube.require(CONNECT_PERMISSIONS).await?;
    if !args.session.skip_cleanup {
        for id in session::clean_expired(&kube).await? {
            tracing::info!("Removed expired session {id}");
        }
    }
    let plan = plan(&kube, args).await?;
    for r in &plan.routes {
        tracing::info!("Routing {} through the cluster", r.net);
        tracing::debug!("CIDR {} is aliased at {}", r.net, r.alias);
    }

    shadow_opts.routes = plan.routes.iter().map(|r| r.net.to_string()).collect();
    shadow_opts.except = plan.excluded.iter().map(|n| n.to_string()).collect();

    let grace = Duration::from_secs(args.session.grace);
    let pf_timeout = Duration::from_secs(global.port_forward_timeout);
    let interrupts =
        Interrupts::install("connect").map_err(|e| Error::io("handling signals", e))?;
    // Signals count from here: whoever waits next (setup or the body) sees every one.
    let mark = interrupts.count();
    super::with_shadow(
        &kube,
        &shadow_opts,
        "connect",
        grace,
        pf_timeout,
        &interrupts,
        Signals::Body,
        async |session, tunnel| {
            connected(
                &kube,
                session,
                tunnel,
                args,
                plan,
                attach_to,
                &interrupts,
                mark,
            )
            .await
        },
    )
    .await
}

/// kt-connect's connect flags that mean nothing here: one line each, saying why.
fn compatibility_notes(args: &ConnectArgs) {
    if let Some(m) = args.mode {
        tracing::info!(
            "--mode {}: accepted for compatibility; ktctl redirects with eBPF socket hooks, without a TUN device or sshuttle",
            format!("{m:?}").to_lowercase()
        );
    }
    if let DnsMode::Local(Some(order)) = &args.dns_mode {
        tracing::info!(
            "--dnsMode localDNS:{order}: accepted; ktctl's order is fixed: cluster names are answered from the cluster, every other name by this machine's resolvers"
        );
    }
    if args.disable_tun_device || args.disable_tun_route {
        tracing::info!(
            "--disableTunDevice/--disableTunRoute: accepted for compatibility; ktctl makes no TUN device and adds no routes"
        );
    }
    if args.proxy_port.is_some() || args.proxy_addr.is_some() {
        tracing::info!(
            "--proxyPort/--proxyAddr: accepted for compatibility; ktctl runs no SOCKS proxy"
        );
    }
}

/// The cluster's CIDRs plus --includeIps, minus --excludeIps and the API server.
async fn plan(kube: &Kube, args: &ConnectArgs) -> Result<Plan> {
    let mut include = kube.cidrs(!args.disable_pod_ip).await?;
    include.extend(args.include_ips.iter().copied());
    let mut exclude = args.exclude_ips.clone();
    for ip in &kube.server_ips {
        if let IpAddr::V4(v4) = ip {
            exclude.push(Ipv4Net::from(*v4));
        }
    }
    Ok(Plan::new(&include, &exclude)?)
}

/// Everything between the tunnel coming up and the session's end. Signals after `mark` are
/// this body's to handle (with_shadow hands them over), so none is lost while it sets up.
#[expect(
    clippy::too_many_arguments,
    reason = "the command's state, passed once"
)]
async fn connected(
    kube: &Kube,
    session: &Session,
    tunnel: &Tunnel,
    args: &ConnectArgs,
    plan: Plan,
    attach_to: PathBuf,
    interrupts: &Interrupts,
    mark: u64,
) -> Result<u8> {
    let tunnel = tunnel.clone();
    // Local sockets first, so that nothing is steered to a socket that does not exist yet.
    let tcp =
        proxy::tcp::listener().map_err(|e| Error::io("making the proxy's TCP listener", e))?;
    let udp = proxy::udp::socket().map_err(|e| Error::io("making the proxy's UDP socket", e))?;
    let plan = Arc::new(plan);
    let orig = OrigDst::new(plan.clone());
    let tcp = tokio::net::TcpListener::from_std(tcp).map_err(|e| Error::io("proxy listener", e))?;
    let udp = tokio::net::UdpSocket::from_std(udp).map_err(|e| Error::io("proxy socket", e))?;

    let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let (resolvers, search) = dns::host_config(&resolv);
    let resolvers: Vec<Ipv4Addr> = resolvers
        .into_iter()
        .filter(|r| !plan.is_cluster(*r))
        .take(15)
        .collect();
    let mut index = Index::start(kube).await?;
    if let Some(ip) = args.ingress_ip {
        index.watch_ingresses(kube, ip).await?;
        tracing::info!(
            "Ingress hosts of namespace {} resolve to {ip}",
            kube.namespace
        );
    }
    let rules = Rules {
        cluster_domain: args.cluster_domain.clone(),
        namespace: kube.namespace.clone(),
        host_search: search,
        pod_dns: args.dns_mode == DnsMode::Pod,
    };
    let shared = dns::Shared::new(
        rules,
        index,
        tunnel.clone(),
        Duration::from_secs(args.dns_cache_ttl),
    );
    let mut dns_servers = vec![];
    for (i, r) in resolvers.iter().enumerate() {
        let listen = Ipv4Addr::from(DNS_ALIAS_NET + i as u32 + 1);
        let server = dns::serve(listen, *r, shared.clone())
            .map_err(|e| Error::io(format!("starting the DNS server on {listen}:53"), e))?;
        tracing::info!("DNS for the cluster in front of resolver {r} (on {listen}:53)");
        dns_servers.push(server);
    }
    if resolvers.is_empty() {
        tracing::warn!(
            "no IPv4 nameserver in /etc/resolv.conf: cluster names will not resolve (IPs still work)"
        );
    }

    let child = if args.cmd.is_empty() {
        None
    } else {
        Some(ChildCgroup::create(
            &attach_to,
            &cgroup::child_name(&session.id),
        )?)
    };
    let cgroup_path = child
        .as_ref()
        .map(|c| c.path().to_path_buf())
        .unwrap_or_else(|| attach_to.clone());
    let netns =
        File::open("/proc/self/ns/net").map_err(|e| Error::io("opening /proc/self/ns/net", e))?;
    let hooks = Hooks::attach(
        &cgroup_path,
        &netns,
        &HookConfig {
            plan: &plan,
            resolvers: &resolvers,
            // With -- CMD, everyone else under --cgroup is kept away from the aliases.
            guard: child.as_ref().map(|_| attach_to.as_path()),
        },
        &tcp,
        &udp,
    )?;
    let tcp_task = AbortOnDrop(tokio::spawn(proxy::tcp::serve(
        tcp,
        orig.clone(),
        tunnel.clone(),
    )));
    let udp_task = AbortOnDrop(tokio::spawn(proxy::udp::serve(udp, orig, tunnel.clone())));
    tracing::info!("eBPF hooks attached to cgroup {}", cgroup_path.display());
    tracing::info!("---------------------------------------------------------------");
    tracing::info!(" {BANNER}");
    tracing::info!("---------------------------------------------------------------");

    let code = match child {
        Some(cg) => run_command(&args.cmd, &cg, interrupts, mark).await?,
        None => {
            let sig = interrupts.after(mark).await;
            tracing::info!("{}", interrupt::describe(sig));
            0
        }
    };
    tracing::debug!(counters = ?hooks.counters(), "hook counters");
    drop(hooks);
    drop((tcp_task, udp_task, dns_servers));
    Ok(code)
}

/// Runs CMD inside the child cgroup; returns its exit code (128 + signal if killed). A signal
/// to ktctl (SIGINT, SIGTERM, SIGHUP) is passed on to CMD, which decides when to end.
async fn run_command(
    cmd: &[String],
    cg: &ChildCgroup,
    interrupts: &Interrupts,
    mut seen: u64,
) -> Result<u8> {
    use std::os::unix::process::CommandExt;
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cg.path().join("cgroup.procs"))
        .map_err(|e| Error::io(format!("opening {}", cg.path().display()), e))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&procs);
    let mut c = std::process::Command::new(&cmd[0]);
    c.args(&cmd[1..]);
    // SAFETY: between fork and exec, only write(2) on a descriptor opened beforehand.
    unsafe {
        c.pre_exec(move || {
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = tokio::process::Command::from(c)
        .spawn()
        .map_err(|e| Error::Runtime(format!("cannot run {}: {e}", cmd[0])))?;
    drop(procs);
    let pid = child.id().map(|p| p as i32);
    let status = loop {
        tokio::select! {
            s = child.wait() => break s.map_err(|e| Error::io("waiting for the command", e))?,
            sig = interrupts.after(seen) => {
                seen = interrupts.count();
                forward(pid, sig);
            }
        }
    };
    use std::os::unix::process::ExitStatusExt;
    Ok(status
        .code()
        .map(|c| c as u8)
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0) as u8))
}

fn forward(pid: Option<i32>, sig: i32) {
    if let Some(pid) = pid {
        // SAFETY: kill(2) on the child this process started.
        unsafe { libc::kill(pid, sig) };
    }
}

/// One connect per network namespace (with or without `-- CMD`): the alias space and the
/// sk_lookup steering are the namespace's, so a second session's would collide.
struct NetnsLock {
    _file: File,
}

impl NetnsLock {
    fn acquire() -> Result<NetnsLock> {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata("/proc/self/ns/net")
            .map(|m| m.ino())
            .unwrap_or(0);
        let dir = PathBuf::from("/run/ktctl");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating /run/ktctl", e))?;
        let path = dir.join(format!("connect-{ino}.lock"));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        // SAFETY: flock on our own descriptor.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(EnvError::new(format!(
                "another ktctl connect is running in this network namespace (pid {}); stop it first",
                holder.trim()
            ))
            .into());
        }
        let _ = f.set_len(0);
        let _ = write!(f, "{}", std::process::id());
        Ok(NetnsLock { _file: f })
    }
}
