//! Command line: kubectl's flags (`--kubeconfig`, `--context`, `-n`) and kt-connect's, each
//! of kt-connect's accepted in camelCase (as kt-connect spells it) and kebab-case.

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand};
use ipnet::Ipv4Net;

/// The agent image: push the one `cargo xtask image` builds and point `--image` at it.
pub const DEFAULT_IMAGE: &str = concat!("kt-router:", env!("CARGO_PKG_VERSION"));

#[derive(Parser, Debug)]
#[command(
    name = "ktctl",
    // kt-connect prints `ktctl version <v>` for -v/--version.
    version = concat!("version ", env!("CARGO_PKG_VERSION")),
    disable_version_flag = true,
    about = "Reach a Kubernetes cluster from this machine as if it were local",
    long_about = "Reach a Kubernetes cluster from this machine as if it were local.\n\n\
        `ktctl connect` makes every program here reach cluster Services by name, ClusterIP and pod IP, \
        through eBPF socket hooks and one mutually authenticated TLS tunnel to a shadow pod."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command takes.
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config)
    #[arg(short = 'c', long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: the current context)
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Namespace for ktctl's objects (default: the context's namespace)
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// Print the version (`-v`, as kt-connect; more output is -d/--debug or --verbose)
    #[arg(short = 'v', long = "version", action = ArgAction::Version)]
    pub version: (),
    /// More output: once debug, twice trace (KT_LOG overrides, e.g. KT_LOG=ktctl=trace)
    #[arg(long = "verbose", action = ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Debug output (same as --verbose)
    #[arg(short = 'd', long, global = true)]
    pub debug: bool,
    /// Image of the shadow (kt-router)
    #[arg(short = 'i', long, global = true, default_value = DEFAULT_IMAGE, env = "KT_IMAGE")]
    pub image: String,
    /// Pull the shadow's image every time (imagePullPolicy Always)
    #[arg(
        short = 'f',
        long = "forceUpdate",
        visible_alias = "force-update",
        global = true
    )]
    pub force_update: bool,
    /// Extra labels of ktctl's pods, as key=value[,key=value]
    #[arg(
        short = 'l',
        long = "withLabel",
        visible_alias = "with-label",
        global = true
    )]
    pub with_label: Option<String>,
    /// Extra annotations of ktctl's pods, as key=value[,key=value]
    #[arg(
        long = "withAnnotation",
        visible_alias = "with-annotation",
        global = true
    )]
    pub with_annotation: Option<String>,
    /// Accepted for kt-connect's scripts: the shadow always runs as a ServiceAccount of its own
    /// session, which may touch only that session's objects
    #[arg(
        long = "serviceAccount",
        visible_alias = "service-account",
        global = true
    )]
    pub service_account: Option<String>,
    /// Accepted for kt-connect's scripts: the shadow is always a bare pod owned by the
    /// session, which ktctl replaces itself (a restarted shadow would have a new key)
    #[arg(
        long = "useShadowDeployment",
        visible_alias = "use-shadow-deployment",
        global = true
    )]
    pub use_shadow_deployment: bool,
    /// Accepted for kt-connect's scripts: liveness is read on the API server's clock alone,
    /// so no machine's local time is ever compared
    #[arg(long = "useLocalTime", visible_alias = "use-local-time", global = true)]
    pub use_local_time: bool,
    /// Seconds to wait for the port-forward to the shadow
    #[arg(
        long = "portForwardTimeout",
        visible_alias = "port-forward-timeout",
        global = true,
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..=600)
    )]
    pub port_forward_timeout: u64,
    /// Secret for pulling the shadow's image
    #[arg(
        long = "imagePullSecret",
        visible_alias = "image-pull-secret",
        global = true
    )]
    pub image_pull_secret: Option<String>,
    /// Where the shadow may run, as key=value[,key=value]
    #[arg(long = "nodeSelector", visible_alias = "node-selector", global = true)]
    pub node_selector: Option<String>,
    /// CPU and memory of the shadow: 0.5c,512m (c: CPU; k/m/g: KiB/MiB/GiB; either may be
    /// left out) or Kubernetes quantities (0.5,256Mi)
    #[arg(long = "podQuota", visible_alias = "pod-quota", global = true)]
    pub pod_quota: Option<String>,
    /// Seconds to wait for the shadow pod to be ready
    #[arg(
        long = "podCreationTimeout",
        visible_alias = "pod-creation-timeout",
        global = true,
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(1..=3_600)
    )]
    pub pod_creation_timeout: u64,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Reach cluster Services by DNS name, ClusterIP and pod IP from this machine
    Connect(ConnectArgs),
    /// Redirect all traffic of a cluster Service (or workload) to local ports
    Exchange(ExchangeArgs),
    /// Redirect only requests carrying your header to local ports; the rest stays in-cluster
    Mesh(MeshArgs),
    /// Make a local service reachable in the cluster as a Service
    Preview(PreviewArgs),
    /// Make a cluster Service, pod, Deployment or address reachable on localhost
    Forward(ForwardArgs),
    /// Undo a leftover exchange or mesh of a Service, from what ktctl wrote on the objects
    Recover(RecoverArgs),
    /// Remove what expired sessions left in the namespace, restoring what they changed
    Clean(CleanArgs),
    /// Show which Services of the namespace are exchanged, meshed or previewed, and by whom
    Birdseye(BirdseyeArgs),
    /// Show and change the defaults of ktctl's flags (~/.kt/config) and their profiles
    Config(ConfigArgs),
    /// List this machine's running ktctl processes and what each changed in the cluster
    Status(StatusArgs),
    /// End running ktctl processes gracefully, as Ctrl-C would
    Stop(StopArgs),
    /// Check this machine and measure the way to the cluster (round trips, throughput, DNS)
    Diagnose(DiagnoseArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// `ktctl connect`.
#[derive(Args, Debug, Clone)]
pub struct ConnectArgs {
    /// The cluster's DNS domain
    #[arg(
        long = "clusterDomain",
        visible_alias = "cluster-domain",
        default_value = "cluster.local"
    )]
    pub cluster_domain: String,
    /// More CIDRs (or IPs) to reach through the cluster, comma separated (not loopback)
    #[arg(long = "includeIps", visible_alias = "include-ips", value_delimiter = ',', value_parser = parse_include)]
    pub include_ips: Vec<Ipv4Net>,
    /// CIDRs (or IPs) never to redirect, comma separated
    #[arg(long = "excludeIps", visible_alias = "exclude-ips", value_delimiter = ',', value_parser = parse_net)]
    pub exclude_ips: Vec<Ipv4Net>,
    /// TTL of the DNS answers ktctl makes, and the longest a relayed answer is cached (seconds)
    #[arg(
        long = "dnsCacheTtl",
        visible_alias = "dns-cache-ttl",
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(0..=86_400)
    )]
    pub dns_cache_ttl: u64,
    /// kt-connect's shared shadow: refused, as every session's shadow holds credentials only
    /// that session has
    #[arg(long = "shareShadow", visible_alias = "share-shadow")]
    pub share_shadow: bool,
    /// Do not route pod IPs, only Service IPs
    #[arg(long = "disablePodIp", visible_alias = "disable-pod-ip")]
    pub disable_pod_ip: bool,
    /// localDNS: cluster names answered here, the rest by this machine's resolvers;
    /// podDNS: every name by the cluster's DNS (hosts is refused: ktctl never edits /etc/hosts)
    #[arg(
        long = "dnsMode",
        visible_alias = "dns-mode",
        default_value = "localDNS",
        value_parser = parse_dns_mode
    )]
    pub dns_mode: DnsMode,
    /// Answer the host names of the namespace's Ingresses with this address
    #[arg(long = "ingressIp", visible_alias = "ingress-ip")]
    pub ingress_ip: Option<std::net::Ipv4Addr>,
    /// kt-connect's tun2socks or sshuttle: accepted; ktctl redirects with eBPF socket hooks
    #[arg(long, value_enum, hide_possible_values = false)]
    pub mode: Option<ConnectMode>,
    /// Accepted for kt-connect's scripts: ktctl has no TUN device
    #[arg(long = "disableTunDevice", visible_alias = "disable-tun-device")]
    pub disable_tun_device: bool,
    /// Accepted for kt-connect's scripts: ktctl adds no routes
    #[arg(long = "disableTunRoute", visible_alias = "disable-tun-route")]
    pub disable_tun_route: bool,
    /// Accepted for kt-connect's scripts: ktctl runs no SOCKS proxy
    #[arg(long = "proxyPort", visible_alias = "proxy-port")]
    pub proxy_port: Option<u16>,
    /// Accepted for kt-connect's scripts: ktctl runs no SOCKS proxy
    #[arg(long = "proxyAddr", visible_alias = "proxy-addr")]
    pub proxy_addr: Option<String>,
    #[command(flatten)]
    pub session: SessionArgs,
    /// cgroup v2 to hook machine-wide (default: $KT_CGROUP, else the cgroup v2 root)
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// Run CMD with the cluster reachable for it (and its children) only; ends with CMD
    #[arg(last = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

/// kt-connect's connect modes.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
#[value(rename_all = "lower")]
pub enum ConnectMode {
    Tun2socks,
    Sshuttle,
}

/// `--dnsMode`, in kt-connect's forms (`localDNS[:order]`, `podDNS`, `hosts[:namespaces]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsMode {
    /// With kt-connect's optional order (ktctl's is fixed; see connect).
    Local(Option<String>),
    Pod,
    Hosts(Option<String>),
}

/// Parses `--dnsMode` (mode names are case-insensitive).
pub fn parse_dns_mode(s: &str) -> Result<DnsMode, String> {
    let (mode, param) = match s.split_once(':') {
        Some((m, p)) => (m, Some(p.to_string()).filter(|p| !p.is_empty())),
        None => (s, None),
    };
    match mode.to_ascii_lowercase().as_str() {
        "localdns" => Ok(DnsMode::Local(param)),
        "poddns" => Ok(DnsMode::Pod),
        "hosts" => Ok(DnsMode::Hosts(param)),
        _ => Err(format!(
            "{s:?}: give localDNS, podDNS or hosts (kt-connect's modes)"
        )),
    }
}

/// What every command that runs a shadow takes.
#[derive(Args, Debug, Clone)]
pub struct SessionArgs {
    /// Do not remove the objects of expired sessions at start
    #[arg(long = "skipCleanup", visible_alias = "skip-cleanup")]
    pub skip_cleanup: bool,
    /// Seconds the shadow waits for a vanished ktctl before it ends the session (and restores
    /// what the session changed)
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(5..=86_400))]
    pub grace: u64,
}

/// One `--expose` entry: a local port and the port in the cluster it answers for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortMap {
    pub local: u16,
    pub remote: u16,
}

impl std::fmt::Display for PortMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.local == self.remote {
            write!(f, "{}", self.local)
        } else {
            write!(f, "{}:{}", self.local, self.remote)
        }
    }
}

/// `--expose`: `port` or `local:remote`, comma separated (`8080:80,9090`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expose(pub Vec<PortMap>);

fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u32>() {
        Ok(p) if (1..=65_535).contains(&p) => Ok(p as u16),
        Ok(p) => Err(format!("port {p} is out of range (1-65535)")),
        Err(_) => Err(format!("{s:?} is not a port number")),
    }
}

/// Parses `--expose`. A remote port given twice is refused: it could go to one local port only.
pub fn parse_expose(s: &str) -> Result<Expose, String> {
    let mut out: Vec<PortMap> = vec![];
    for part in s.split(',').map(str::trim) {
        if part.is_empty() {
            return Err(format!(
                "{s:?}: an empty entry; give port or local:remote, comma separated"
            ));
        }
        let map = match part.split_once(':') {
            Some((l, r)) => PortMap {
                local: parse_port(l)?,
                remote: parse_port(r)?,
            },
            None => {
                let p = parse_port(part)?;
                PortMap {
                    local: p,
                    remote: p,
                }
            }
        };
        if out.iter().any(|m| m.remote == map.remote) {
            return Err(format!("remote port {} is given twice", map.remote));
        }
        out.push(map);
    }
    Ok(Expose(out))
}

/// `--expose` and `--skipPortChecking`, as exchange, mesh and preview take them.
#[derive(Args, Debug, Clone)]
pub struct ExposeArgs {
    /// Ports to expose: port or local:remote, comma separated (8080:80,9090)
    #[arg(long, required = true, value_parser = parse_expose)]
    pub expose: Expose,
    /// Do not check that the local ports accept connections before starting
    #[arg(long = "skipPortChecking", visible_alias = "skip-port-checking")]
    pub skip_port_checking: bool,
}

/// How `exchange` takes the target's traffic.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExchangeMode {
    /// The Service's selector points at the shadow (restored on exit)
    Selector,
    /// The workload is scaled to 0 and the shadow carries its pod labels
    Scale,
    /// The router DaemonSet steers the Service's traffic to the shadow inside each node;
    /// nothing in the Service or its workload changes (deploy/router.yaml)
    Ebpf,
    /// kt-connect's ephemeral-container mode: refused, with the reason
    Ephemeral,
}

/// `ktctl exchange`.
#[derive(Args, Debug, Clone)]
pub struct ExchangeArgs {
    /// <svc>, service/<svc>, svc/<svc>, deployment/<name>, deploy/<name> or pod/<name>
    pub target: String,
    #[command(flatten)]
    pub expose: ExposeArgs,
    /// selector, scale or ebpf
    #[arg(long, value_enum, default_value = "selector")]
    pub mode: ExchangeMode,
    /// Seconds to wait for the workload's pods to be ready again after exit (scale mode)
    #[arg(
        long = "recoverWaitTime",
        visible_alias = "recover-wait-time",
        default_value_t = 120,
        value_parser = clap::value_parser!(u64).range(0..=3_600)
    )]
    pub recover_wait_time: u64,
    #[command(flatten)]
    pub session: SessionArgs,
}

/// How `mesh` takes the target's traffic.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeshMode {
    /// A shared header router takes the Service; your header's requests come to you
    Auto,
    /// Only a shadow with the Service's selector labels plus <key>=<mark>, for your Istio rules
    Manual,
    /// The router DaemonSet (deploy/router.yaml) routes by header inside the nodes; nothing in
    /// the Service changes
    Ebpf,
}

/// `ktctl mesh`.
#[derive(Args, Debug, Clone)]
pub struct MeshArgs {
    /// <svc>, service/<svc>, svc/<svc>, deployment/<name> or deploy/<name>
    pub target: String,
    #[command(flatten)]
    pub expose: ExposeArgs,
    /// auto, manual or ebpf
    #[arg(long, value_enum, default_value = "auto")]
    pub mode: MeshMode,
    /// key:val, val (key version) or key: (a random val): requests with header key: val come here
    #[arg(long = "versionMark", visible_alias = "version-mark")]
    pub version_mark: Option<String>,
    /// Image of the mesh router (default: the shadow's image)
    #[arg(long = "routerImage", visible_alias = "router-image")]
    pub router_image: Option<String>,
    #[command(flatten)]
    pub session: SessionArgs,
}

/// `ktctl preview`.
#[derive(Args, Debug, Clone)]
pub struct PreviewArgs {
    /// Name of the Service to create
    pub name: String,
    #[command(flatten)]
    pub expose: ExposeArgs,
    /// Make it a LoadBalancer Service
    #[arg(long)]
    pub external: bool,
    #[command(flatten)]
    pub session: SessionArgs,
}

/// `ktctl forward`.
#[derive(Args, Debug, Clone)]
pub struct ForwardArgs {
    /// <svc>, service/<svc>, svc/<svc>, pod/<name>, deployment/<name>, deploy/<name> or an IP
    pub target: String,
    /// local[:remote] (default: the target's first port, on the same local port)
    pub ports: Option<String>,
    #[command(flatten)]
    pub session: SessionArgs,
}

/// `ktctl recover`.
#[derive(Args, Debug, Clone)]
pub struct RecoverArgs {
    /// <svc>, service/<svc> or svc/<svc>
    pub target: String,
}

/// `ktctl clean`.
#[derive(Args, Debug, Clone)]
pub struct CleanArgs {
    /// Only say what would be removed and restored
    #[arg(long = "dryRun", visible_alias = "dry-run")]
    pub dry_run: bool,
    /// Minutes a session must have been silent to be taken for dead (never less than twice its
    /// --grace, so a live session is never touched)
    #[arg(
        long = "thresholdInMinus",
        visible_alias = "threshold-in-minus",
        default_value_t = 5,
        value_parser = clap::value_parser!(u64).range(0..=525_600)
    )]
    pub threshold_in_minus: u64,
    /// Only this machine's leftovers (pid files of ended ktctl processes), not the cluster's
    #[arg(long = "localOnly", visible_alias = "local-only")]
    pub local_only: bool,
}

/// `ktctl config`.
#[derive(Args, Debug, Clone)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub action: ConfigAction,
}

/// What `ktctl config` does. Items are `<group>.<item>`: `global.namespace`,
/// `connect.dns-cache-ttl` (`config show --all` lists them).
#[derive(Subcommand, Debug, Clone)]
pub enum ConfigAction {
    /// Show the items set (--all: every item, with its built-in default)
    Show {
        /// Every item, also those not set (with the built-in default when there is one)
        #[arg(short = 'a', long)]
        all: bool,
    },
    /// Print the value of items
    Get {
        /// Items, as <group>.<item> (global.namespace)
        #[arg(required = true)]
        items: Vec<String>,
    },
    /// Set an item: `set <item> <value>`, `set <item>=<value>` or `set <item> = <value>`
    Set {
        /// <group>.<item> <value>, <group>.<item>=<value> or <group>.<item> = <value>
        #[arg(required = true, num_args = 1..=3, allow_hyphen_values = true)]
        words: Vec<String>,
    },
    /// Remove items, so that their flags have their built-in defaults again
    Unset {
        /// Items, as <group>.<item>
        items: Vec<String>,
        /// Every item
        #[arg(short = 'a', long, conflicts_with = "items")]
        all: bool,
    },
    /// List the saved profiles
    ListProfile,
    /// Save the current config as a profile
    SaveProfile {
        /// Letters, digits, '-', '_' and '.'
        name: String,
    },
    /// Make a profile the current config
    LoadProfile {
        /// A saved profile (list-profile lists them)
        name: String,
        /// Print the profile instead of loading it
        #[arg(long = "dryRun", visible_alias = "dry-run")]
        dry_run: bool,
    },
    /// Delete a profile
    DropProfile {
        /// A saved profile
        name: String,
    },
}

/// How a listing is printed.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// Columns for people
    #[default]
    Table,
    /// JSON for scripts
    Json,
}

/// How birdseye orders the Services.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortBy {
    /// By state, then name
    Status,
    /// By name
    Name,
}

/// `ktctl birdseye`.
#[derive(Args, Debug, Clone)]
pub struct BirdseyeArgs {
    /// status or name
    #[arg(
        long = "sortBy",
        visible_alias = "sort-by",
        value_enum,
        default_value = "status"
    )]
    pub sort_by: SortBy,
    /// Also list the users connected to the cluster
    #[arg(long = "showConnector", visible_alias = "show-connector")]
    pub show_connector: bool,
    /// Only the Services that are exchanged, meshed or previewed
    #[arg(long = "hideNaturalService", visible_alias = "hide-natural-service")]
    pub hide_natural_service: bool,
    /// table or json
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: OutputFormat,
}

/// `ktctl status`.
#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// table or json
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: OutputFormat,
}

/// `ktctl stop`.
#[derive(Args, Debug, Clone)]
pub struct StopArgs {
    /// Pids of ktctl processes (`ktctl status` lists them)
    pub pids: Vec<u32>,
    /// Every ktctl of this machine
    #[arg(long, conflicts_with = "pids")]
    pub all: bool,
    /// Seconds to wait for each to finish its cleanup
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3_600))]
    pub timeout: u64,
}

/// `ktctl diagnose`.
#[derive(Args, Debug, Clone)]
pub struct DiagnoseArgs {
    /// Round trips to measure
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub pings: u32,
    /// MiB to send each way for the throughput
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=16_384))]
    pub mib: u64,
    /// The cluster's DNS domain
    #[arg(
        long = "clusterDomain",
        visible_alias = "cluster-domain",
        default_value = "cluster.local"
    )]
    pub cluster_domain: String,
}

/// A CIDR, or a single address as a /32.
pub fn parse_net(s: &str) -> Result<Ipv4Net, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<Ipv4Net>() {
        return Ok(n.trunc());
    }
    if let Ok(ip) = s.parse::<std::net::Ipv4Addr>() {
        return Ok(Ipv4Net::from(ip));
    }
    if s.contains(':') {
        return Err(format!("{s:?}: IPv6 is not supported yet; give IPv4 CIDRs"));
    }
    Err(format!(
        "{s:?} is neither an IPv4 CIDR (10.0.0.0/16) nor an IPv4 address"
    ))
}

/// An `--includeIps` entry: a CIDR or address, not loopback (ktctl's own aliases live there,
/// and the machine's services must stay local).
pub fn parse_include(s: &str) -> Result<Ipv4Net, String> {
    let net = parse_net(s)?;
    if crate::cidr::overlaps_loopback(&net) {
        return Err(format!(
            "{net} overlaps loopback (127.0.0.0/8), which stays on this machine and holds ktctl's own aliases; give the cluster's addresses"
        ));
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("ktctl").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    fn connect(cli: Cli) -> ConnectArgs {
        match cli.command {
            Command::Connect(a) => a,
            other => panic!("not connect: {other:?}"),
        }
    }

    #[test]
    fn dns_modes_parse_in_kt_connects_forms() {
        assert_eq!(parse_dns_mode("localDNS"), Ok(DnsMode::Local(None)));
        assert_eq!(
            parse_dns_mode("localDNS:upstream,cluster"),
            Ok(DnsMode::Local(Some("upstream,cluster".into())))
        );
        assert_eq!(parse_dns_mode("podDNS"), Ok(DnsMode::Pod));
        assert_eq!(parse_dns_mode("PODDNS"), Ok(DnsMode::Pod));
        assert_eq!(
            parse_dns_mode("hosts:default,dev"),
            Ok(DnsMode::Hosts(Some("default,dev".into())))
        );
        assert!(parse_dns_mode("tun").is_err());
        let cli = parse(&["connect"]);
        assert_eq!(connect(cli).dns_mode, DnsMode::Local(None), "the default");
    }

    #[test]
    fn kt_connects_global_flags_parse_before_or_after_the_command() {
        for args in [
            &[
                "-c",
                "/k",
                "-i",
                "img",
                "-f",
                "-l",
                "a=b",
                "--portForwardTimeout",
                "20",
                "connect",
            ][..],
            &[
                "connect",
                "-c",
                "/k",
                "-i",
                "img",
                "-f",
                "-l",
                "a=b",
                "--port-forward-timeout",
                "20",
            ],
        ] {
            let cli = parse(args);
            assert_eq!(
                cli.global.kubeconfig.as_deref(),
                Some(std::path::Path::new("/k"))
            );
            assert_eq!(cli.global.image, "img");
            assert!(cli.global.force_update);
            assert_eq!(cli.global.with_label.as_deref(), Some("a=b"));
            assert_eq!(cli.global.port_forward_timeout, 20);
        }
        let cli = parse(&[
            "connect",
            "--mode",
            "sshuttle",
            "--disableTunDevice",
            "--disable-tun-route",
            "--proxyPort",
            "2223",
            "--proxyAddr",
            "127.0.0.1",
            "--ingressIp",
            "10.0.0.1",
            "--serviceAccount",
            "default",
            "--useShadowDeployment",
            "--useLocalTime",
        ]);
        assert_eq!(connect(cli).mode, Some(ConnectMode::Sshuttle));
        let e = Cli::try_parse_from(["ktctl", "-v"]).expect_err("prints the version");
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayVersion);
        assert_eq!(
            e.to_string().trim(),
            format!("ktctl version {}", env!("CARGO_PKG_VERSION"))
        );
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn camel_and_kebab_spellings_mean_the_same() {
        let pairs = [
            (
                vec!["connect", "--includeIps", "10.1.0.0/16,10.2.0.5"],
                vec!["connect", "--include-ips", "10.1.0.0/16,10.2.0.5"],
            ),
            (
                vec!["connect", "--excludeIps", "10.96.5.0/24"],
                vec!["connect", "--exclude-ips", "10.96.5.0/24"],
            ),
            (
                vec!["connect", "--dnsCacheTtl", "5"],
                vec!["connect", "--dns-cache-ttl", "5"],
            ),
            (
                vec!["connect", "--clusterDomain", "k8s.local"],
                vec!["connect", "--cluster-domain", "k8s.local"],
            ),
            (
                vec!["connect", "--portForwardTimeout", "3"],
                vec!["connect", "--port-forward-timeout", "3"],
            ),
            (
                vec!["connect", "--disablePodIp", "--skipCleanup"],
                vec!["connect", "--disable-pod-ip", "--skip-cleanup"],
            ),
            (
                vec!["--podQuota", "0.5,256Mi", "connect"],
                vec!["--pod-quota", "0.5,256Mi", "connect"],
            ),
            (
                vec!["--imagePullSecret", "s", "--nodeSelector", "a=b", "connect"],
                vec![
                    "--image-pull-secret",
                    "s",
                    "--node-selector",
                    "a=b",
                    "connect",
                ],
            ),
            (
                vec!["--podCreationTimeout", "9", "connect"],
                vec!["--pod-creation-timeout", "9", "connect"],
            ),
        ];
        for (camel, kebab) in pairs {
            assert_eq!(
                format!("{:?}", parse(&camel)),
                format!("{:?}", parse(&kebab)),
                "{camel:?} vs {kebab:?}"
            );
        }
    }

    #[test]
    fn kubectl_flags_and_defaults() {
        let c = parse(&[
            "-n",
            "dev",
            "--context",
            "kind",
            "--kubeconfig",
            "/tmp/kc",
            "connect",
        ]);
        assert_eq!(c.global.namespace.as_deref(), Some("dev"));
        assert_eq!(c.global.context.as_deref(), Some("kind"));
        assert_eq!(c.global.kubeconfig, Some(PathBuf::from("/tmp/kc")));
        let a = connect(c);
        assert_eq!(a.session.grace, 30);
        assert_eq!(a.dns_cache_ttl, 60);
        assert_eq!(a.cluster_domain, "cluster.local");
        assert!(a.cmd.is_empty());
        // Global flags also work after the subcommand.
        assert_eq!(
            parse(&["connect", "-n", "x"]).global.namespace.as_deref(),
            Some("x")
        );
    }

    #[test]
    fn ips_parse_as_cidrs_or_hosts() {
        let a = connect(parse(&[
            "connect",
            "--includeIps",
            "10.1.2.3/16, 172.20.0.9",
        ]));
        assert_eq!(
            a.include_ips,
            vec![
                "10.1.0.0/16".parse::<Ipv4Net>().unwrap(),
                "172.20.0.9/32".parse().unwrap()
            ]
        );
        for bad in ["banana", "10.0.0.0/33", "fd00::/8"] {
            assert!(
                Cli::try_parse_from(["ktctl", "connect", "--includeIps", bad]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_command_after_the_double_dash() {
        let a = connect(parse(&[
            "connect",
            "--grace",
            "10",
            "--",
            "curl",
            "-s",
            "http://nginx",
        ]));
        assert_eq!(a.cmd, vec!["curl", "-s", "http://nginx"]);
        assert_eq!(a.session.grace, 10);
    }

    /// Parses `args`, expecting a usage error (exit code 2) that names `flag`.
    fn refused(args: &[&str], flag: &str) {
        let e = Cli::try_parse_from(std::iter::once("ktctl").chain(args.iter().copied()))
            .err()
            .unwrap_or_else(|| panic!("{args:?} was accepted"));
        assert_eq!(e.exit_code(), 2, "{args:?}");
        let msg = e.to_string();
        assert!(
            msg.contains(flag),
            "{args:?}: the error does not name {flag}: {msg}"
        );
    }

    #[test]
    fn include_ips_refuses_loopback_and_the_alias_space() {
        for bad in [
            "127.0.0.1",
            "127.0.0.0/8",
            "127.128.0.0/16",
            "127.128.5.9",
            "127.127.53.1",
            "0.0.0.0/0",
            "10.1.0.0/16,127.1.2.3",
        ] {
            refused(&["connect", "--includeIps", bad], "--includeIps");
        }
        let a = connect(parse(&["connect", "--includeIps", "126.0.0.0/8,128.0.0.1"]));
        assert_eq!(a.include_ips.len(), 2);
    }

    /// Regression: out-of-range numbers were accepted and then truncated or overflowed (the
    /// DNS TTL cast to u32, --mib multiplied into bytes, timeouts of centuries).
    #[test]
    fn numeric_flags_are_range_checked() {
        let huge = "18446744073709551615";
        for (flag, bad) in [
            ("--grace", "4"),
            ("--grace", "86401"),
            ("--dnsCacheTtl", "86401"),
            ("--dnsCacheTtl", "4294967296"),
            ("--dnsCacheTtl", huge),
            ("--portForwardTimeout", "0"),
            ("--portForwardTimeout", "601"),
            ("--portForwardTimeout", huge),
            ("--podCreationTimeout", "0"),
            ("--podCreationTimeout", "3601"),
            ("--podCreationTimeout", huge),
        ] {
            refused(&["connect", flag, bad], flag);
        }
        for (flag, bad) in [
            ("--mib", "0"),
            ("--mib", "16385"),
            ("--mib", huge),
            ("--pings", "0"),
        ] {
            refused(&["diagnose", flag, bad], flag);
        }
        let cli = parse(&[
            "--podCreationTimeout",
            "3600",
            "connect",
            "--grace",
            "86400",
            "--dnsCacheTtl",
            "0",
            "--portForwardTimeout",
            "600",
        ]);
        assert_eq!(cli.global.port_forward_timeout, 600);
        let a = connect(cli);
        assert_eq!((a.session.grace, a.dns_cache_ttl), (86_400, 0));
        match parse(&["diagnose", "--mib", "16384"]).command {
            Command::Diagnose(d) => assert_eq!(d.mib, 16_384),
            other => panic!("not diagnose: {other:?}"),
        }
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for args in [
            vec!["connect", "--grace", "1"],
            vec!["connect", "--dnsCacheTtl", "-3"],
            vec!["connect", "--nope"],
            vec!["frobnicate"],
        ] {
            let e = Cli::try_parse_from(std::iter::once("ktctl").chain(args.iter().copied()))
                .expect_err("must fail");
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
    }
}
