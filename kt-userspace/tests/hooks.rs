//! The eBPF programs in the kernel, on real sockets: each test makes a network namespace and a
//! child cgroup of its own (removed on drop, also on failure), attaches the hooks there, and
//! runs a client process (python3) inside both. Needs root: `cargo xtask ci` runs these.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;

use kt_common::bpf::KT_SELF_MARK;
use ktctl::bpf::{HookConfig, Hooks};
use ktctl::cidr::Plan;
use ktctl::proxy::OrigDst;
use tokio::io::AsyncWriteExt;

/// A network namespace the test made, deleted when dropped.
struct Netns {
    name: String,
}

impl Netns {
    fn new(name: String) -> Netns {
        run(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        run(&["ip", "-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    fn file(&self) -> fs::File {
        fs::File::open(self.path()).expect("netns file")
    }

    /// The namespace's inode number, as `bpftool link` shows it.
    fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(self.path()).expect("netns file").ino()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A network namespace and a child cgroup (the hooks' cgroup, CMD's in `connect -- CMD`),
/// removed when dropped. A nested sandbox puts that cgroup under a parent of its own, which
/// plays the cgroup given to ktctl.
struct Sandbox {
    cgroup: PathBuf,
    parent: Option<PathBuf>,
    /// Cgroups made inside the others, removed first.
    extra: Vec<PathBuf>,
    netns: Netns,
}

impl Sandbox {
    fn new(tag: &str) -> Sandbox {
        let name = format!("kt-hooktest-{tag}-{}", std::process::id());
        let netns = Netns::new(name.clone());
        let cgroup = ktctl::cgroup::v2_root().expect("cgroup v2").join(&name);
        fs::create_dir(&cgroup).expect("child cgroup");
        Sandbox {
            cgroup,
            parent: None,
            extra: vec![],
            netns,
        }
    }

    /// The hooks' cgroup `cmd` inside a parent cgroup of the sandbox's own.
    fn nested(tag: &str) -> Sandbox {
        let mut sb = Sandbox::new(tag);
        let parent = std::mem::replace(&mut sb.cgroup, PathBuf::new());
        sb.parent = Some(parent.clone());
        sb.cgroup = parent.join("cmd");
        fs::create_dir(&sb.cgroup).expect("nested cgroup");
        sb
    }

    fn parent(&self) -> &PathBuf {
        self.parent.as_ref().expect("a nested sandbox")
    }

    /// A cgroup made inside `under`, removed with the sandbox.
    fn sub_cgroup(&mut self, under: &std::path::Path, name: &str) -> PathBuf {
        let p = under.join(name);
        fs::create_dir(&p).expect("sub cgroup");
        self.extra.push(p.clone());
        p
    }

    fn netns_file(&self) -> fs::File {
        self.netns.file()
    }

    /// A python3 client that starts inside the namespace and the cgroup.
    fn python(&self, script: &str) -> Command {
        python_in(&self.netns, Some(&self.cgroup), script)
    }

    /// Runs a python3 client inside the namespace and the cgroup; returns its stdout.
    fn client(&self, script: &str) -> String {
        output(self.python(script))
    }

    /// Runs a python3 client inside the namespace and `cgroup`; returns its stdout.
    fn client_in(&self, cgroup: &std::path::Path, script: &str) -> String {
        output(python_in(&self.netns, Some(cgroup), script))
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let mut cgroups: Vec<PathBuf> = self.extra.iter().rev().cloned().collect();
        cgroups.push(self.cgroup.clone());
        cgroups.extend(self.parent.clone());
        for cg in &cgroups {
            if let Ok(pids) = fs::read_to_string(cg.join("cgroup.procs")) {
                for pid in pids
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    // SAFETY: kill(2) on the clients this test started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        for cg in &cgroups {
            for _ in 0..100 {
                if fs::remove_dir(cg).is_ok() || !cg.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

/// A python3 process that starts inside `netns` and, if given, `cgroup` (else it stays in
/// the test's own cgroup, which has no hooks). `program` runs in front of python3 (e.g.
/// `unshare --pid --fork`).
fn python_cmd(
    netns: &Netns,
    cgroup: Option<&std::path::Path>,
    program: &[&str],
    script: &str,
) -> Command {
    let ns = netns.file();
    let procs = cgroup.map(|cg| {
        fs::OpenOptions::new()
            .write(true)
            .open(cg.join("cgroup.procs"))
            .expect("cgroup.procs")
    });
    let mut cmd = Command::new(program.first().copied().unwrap_or("python3"));
    if !program.is_empty() {
        cmd.args(&program[1..]).arg("python3");
    }
    cmd.arg("-c")
        .arg(script)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    use std::os::unix::process::CommandExt;
    // SAFETY: setns and write on descriptors opened before the fork; the closure owns
    // them, so they live as long as the command.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(procs) = &procs
                && libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

fn python_in(netns: &Netns, cgroup: Option<&std::path::Path>, script: &str) -> Command {
    python_cmd(netns, cgroup, &[], script)
}

/// Runs `cmd` to its end; returns its stdout, panics if it failed.
fn output(mut cmd: Command) -> String {
    let out = cmd.output().expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "client failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A background process this test started, killed when dropped.
struct Background(std::process::Child);

impl Background {
    /// Starts `cmd` and waits for its first line ("ready").
    fn start(mut cmd: Command) -> Background {
        let mut child = cmd.spawn().expect("spawns");
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let bg = Background(child);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut line).expect("first line");
        assert_eq!(line.trim(), "ready", "the background process did not start");
        bg
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(args: &[&str]) {
    let st = Command::new(args[0])
        .args(&args[1..])
        .status()
        .expect("runs");
    assert!(st.success(), "{args:?} failed");
}

fn plan() -> Plan {
    Plan::new(
        &[
            "10.96.0.0/16".parse().unwrap(),
            "10.244.0.0/16".parse().unwrap(),
        ],
        &["10.96.5.0/24".parse().unwrap()],
    )
    .expect("plan")
}

/// A fake proxy in the sandbox's namespace: answers each TCP connection and UDP datagram with
/// the original destination it decoded from the alias. Runs on a thread of its own (a thread
/// can enter a network namespace alone); returns when `stop` is dropped.
struct FakeProxy {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for FakeProxy {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn fake_proxy(sb: &Sandbox, resolvers: Vec<Ipv4Addr>) -> FakeProxy {
    fake_proxy_guarded(sb, resolvers, None)
}

/// The fake proxy, with the guard on `guard` (the parent of the hooks' cgroup) if given.
fn fake_proxy_guarded(sb: &Sandbox, resolvers: Vec<Ipv4Addr>, guard: Option<PathBuf>) -> FakeProxy {
    let ns = sb.netns_file();
    let cgroup = sb.cgroup.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        // SAFETY: setns on this thread only.
        assert_eq!(
            unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns"
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let plan = Arc::new(plan());
            let orig = OrigDst::new(plan.clone());
            let tcp =
                tokio::net::TcpListener::from_std(ktctl::proxy::tcp::listener().expect("tcp"))
                    .expect("tcp");
            let udp = tokio::net::UdpSocket::from_std(ktctl::proxy::udp::socket().expect("udp"))
                .expect("udp");
            // The "DNS server" for resolver slot 1.
            let dns = tokio::net::UdpSocket::bind("127.127.53.1:53")
                .await
                .expect("dns socket");
            let cfg = HookConfig {
                plan: &plan,
                resolvers: &resolvers,
                guard: guard.as_deref(),
            };
            let hooks = Hooks::attach(&cgroup, &ns, &cfg, &tcp, &udp).expect("hooks attach");
            ready_tx.send(()).expect("ready");
            let tcp_orig = orig.clone();
            let tcp_task = async move {
                loop {
                    let (mut c, _) = tcp.accept().await.expect("accept");
                    let dst = c.local_addr().ok().and_then(|a| tcp_orig.resolve(a));
                    let _ = c
                        .write_all(
                            format!("orig={}\n", dst.map(|d| d.to_string()).unwrap_or_default())
                                .as_bytes(),
                        )
                        .await;
                }
            };
            let udp_fd = udp.as_raw_fd();
            let udp_task = async move {
                let mut buf = [0u8; 2048];
                loop {
                    let (n, client, alias) = udp
                        .async_io(tokio::io::Interest::READABLE, || {
                            recv_orig(udp_fd, &mut buf)
                        })
                        .await
                        .expect("recv");
                    let _ = n;
                    let dst = orig
                        .resolve(SocketAddr::V4(alias))
                        .map(|d| d.to_string())
                        .unwrap_or_default();
                    // Reply from the alias itself, as the real proxy does.
                    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
                        .expect("socket");
                    s.set_reuse_address(true).expect("reuse");
                    s.bind(&SocketAddr::V4(alias).into()).expect("bind alias");
                    s.send_to(
                        format!("orig={dst}").as_bytes(),
                        &SocketAddr::V4(client).into(),
                    )
                    .expect("reply");
                }
            };
            let dns_task = async move {
                let mut buf = [0u8; 512];
                loop {
                    let (_, from) = dns.recv_from(&mut buf).await.expect("dns recv");
                    dns.send_to(b"dns-answer", from).await.expect("dns send");
                }
            };
            tokio::select! {
                _ = stop_rx => {},
                () = tcp_task => {},
                () = udp_task => {},
                () = dns_task => {},
            }
            drop(hooks);
        });
    });
    ready_rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the fake proxy started");
    FakeProxy {
        stop: Some(stop_tx),
        thread: Some(thread),
    }
}

/// recvmsg with IP_ORIGDSTADDR, through the library's own parser.
fn recv_orig(
    fd: i32,
    buf: &mut [u8],
) -> std::io::Result<(usize, std::net::SocketAddrV4, std::net::SocketAddrV4)> {
    ktctl::proxy::udp::recv_orig(fd, buf)
}

const CLIENT: &str = r#"
import socket, sys, json
out = {}
def tcp(host, port, family=socket.AF_INET):
    s = socket.socket(family, socket.SOCK_STREAM); s.settimeout(3)
    try:
        s.connect((host, port))
        line = s.makefile().readline().strip()
        return {"line": line, "peer": s.getpeername()[:2]}
    except OSError as e:
        return {"error": e.errno}
out["cluster"] = tcp("10.96.0.1", 80)
out["pod"] = tcp("10.244.3.4", 8080)
out["outside"] = tcp("192.168.77.1", 80)
out["excluded"] = tcp("10.96.5.5", 80)
out["mapped"] = tcp("::ffff:10.96.0.7", 443, socket.AF_INET6)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(3)
u.sendto(b"hi", ("10.244.3.4", 9000))
data, src = u.recvfrom(100)
out["udp"] = {"data": data.decode(), "src": src}
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.settimeout(3)
c.connect(("10.96.0.10", 53))
c.send(b"q")
out["udp_connected"] = {"data": c.recv(100).decode(), "peer": c.getpeername()}
d = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); d.settimeout(3)
d.sendto(b"query", ("127.0.0.53", 53))
data, src = d.recvfrom(100)
out["dns"] = {"data": data.decode(), "src": src}
print(json.dumps(out))
"#;

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("client output {s:?}: {e}"))
}

#[test]
#[ignore = "needs root (BPF, namespaces, cgroups): cargo xtask ci runs it"]
fn hooks_redirect_cluster_cidrs_only_and_restore_original_addresses() {
    let sb = Sandbox::new("redirect");
    let _proxy = fake_proxy(&sb, vec![Ipv4Addr::new(127, 0, 0, 53)]);
    let out = json(&sb.client(CLIENT));
    // TCP to a ClusterIP and to a pod IP: redirected, the proxy saw the original, and
    // getpeername shows the original too.
    assert_eq!(out["cluster"]["line"], "orig=10.96.0.1:80", "{out}");
    assert_eq!(
        out["cluster"]["peer"],
        serde_json::json!(["10.96.0.1", 80]),
        "{out}"
    );
    assert_eq!(out["pod"]["line"], "orig=10.244.3.4:8080", "{out}");
    // Not a cluster CIDR, and a hole cut by --excludeIps: left alone (no route here).
    assert_eq!(out["outside"]["error"], libc::ENETUNREACH, "{out}");
    assert_eq!(out["excluded"]["error"], libc::ENETUNREACH, "{out}");
    // An AF_INET6 socket to a v4-mapped cluster address.
    assert_eq!(out["mapped"]["line"], "orig=10.96.0.7:443", "{out}");
    assert_eq!(
        out["mapped"]["peer"],
        serde_json::json!(["::ffff:10.96.0.7", 443]),
        "{out}"
    );
    // UDP, unconnected and connected: the reply's source is the cluster address again.
    assert_eq!(out["udp"]["data"], "orig=10.244.3.4:9000", "{out}");
    assert_eq!(
        out["udp"]["src"],
        serde_json::json!(["10.244.3.4", 9000]),
        "{out}"
    );
    assert_eq!(out["udp_connected"]["data"], "orig=10.96.0.10:53", "{out}");
    assert_eq!(
        out["udp_connected"]["peer"],
        serde_json::json!(["10.96.0.10", 53]),
        "{out}"
    );
    // DNS to the known resolver went to ktctl's server, and looks as if the resolver answered.
    assert_eq!(out["dns"]["data"], "dns-answer", "{out}");
    assert_eq!(
        out["dns"]["src"],
        serde_json::json!(["127.0.0.53", 53]),
        "{out}"
    );
}

/// The alias the hooks give `ip` (a cluster address of [`plan`]).
fn alias(ip: [u8; 4]) -> Ipv4Addr {
    plan()
        .alias_of(Ipv4Addr::from(ip))
        .expect("a cluster address")
}

/// A client that, from one process, compares a socket marked as ktctl's own with an unmarked
/// one: TCP to a ClusterIP, and DNS to the known resolver 127.0.0.53 (played by a socket of the
/// client itself, where a marked query must arrive, as ktctl's upstream queries must).
const OWN_SOCKETS: &str = r#"
import os, socket, json
MARK = int(os.environ["KT_SELF_MARK"])
out = {"pid": os.getpid()}
def tcp(mark):
    s = socket.socket(); s.settimeout(3)
    if mark: s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
    try:
        s.connect(("10.96.0.1", 80))
        return {"line": s.makefile().readline().strip()}
    except OSError as e:
        return {"error": e.errno}
resolver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); resolver.settimeout(3)
resolver.bind(("127.0.0.53", 53))
def dns(mark):
    d = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); d.settimeout(3)
    if mark: d.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
    try:
        d.connect(("127.0.0.53", 53))
        d.send(b"query")
        if mark:
            return {"resolver_got": resolver.recv(100).decode()}
        return {"answer": d.recv(100).decode()}
    except OSError as e:
        return {"error": e.errno or str(e)}
out["tcp_marked"] = tcp(True)
out["tcp_unmarked"] = tcp(False)
out["dns_marked"] = dns(True)
out["dns_unmarked"] = dns(False)
print(json.dumps(out))
"#;

fn assert_own_sockets(out: &serde_json::Value) {
    assert_eq!(
        out["tcp_marked"]["error"],
        libc::ENETUNREACH,
        "ktctl's own connect was redirected: {out}"
    );
    assert_eq!(
        out["dns_marked"]["resolver_got"], "query",
        "ktctl's own DNS query did not reach the resolver: {out}"
    );
    assert_eq!(
        out["tcp_unmarked"]["line"], "orig=10.96.0.1:80",
        "an unmarked socket of the same process was not redirected: {out}"
    );
    assert_eq!(
        out["dns_unmarked"]["answer"], "dns-answer",
        "an unmarked DNS query of the same process did not reach ktctl: {out}"
    );
}

#[test]
#[ignore = "needs root (BPF, namespaces, cgroups): cargo xtask ci runs it"]
fn sockets_of_ktctls_own_process_are_never_redirected() {
    let sb = Sandbox::new("bypass");
    let _proxy = fake_proxy(&sb, vec![Ipv4Addr::new(127, 0, 0, 53)]);
    let mut cmd = sb.python(OWN_SOCKETS);
    cmd.env("KT_SELF_MARK", KT_SELF_MARK.to_string());
    assert_own_sockets(&json(&output(cmd)));
}

/// Regression: the hooks knew ktctl by its tgid, compared with ktctl's getpid(), which is
/// another number inside a PID namespace: ktctl's upstream DNS query looped back into itself.
#[test]
#[ignore = "needs root (BPF, namespaces, cgroups): cargo xtask ci runs it"]
fn ktctls_own_sockets_are_recognised_inside_a_pid_namespace() {
    let sb = Sandbox::new("pidns");
    let _proxy = fake_proxy(&sb, vec![Ipv4Addr::new(127, 0, 0, 53)]);
    let mut cmd = python_cmd(
        &sb.netns,
        Some(&sb.cgroup),
        &["unshare", "--pid", "--fork"],
        OWN_SOCKETS,
    );
    cmd.env("KT_SELF_MARK", KT_SELF_MARK.to_string());
    let out = json(&output(cmd));
    assert_eq!(out["pid"], 1, "the client is not in a PID namespace: {out}");
    assert_own_sockets(&out);
}

/// Regression: hooks on a cgroup also rewrote the sockets of its processes in other network
/// namespaces (containers on the developer's machine), sending them to aliases that lead
/// nowhere there, and restored addresses they never rewrote.
#[test]
#[ignore = "needs root (BPF, namespaces, cgroups): cargo xtask ci runs it"]
fn sockets_in_other_network_namespaces_are_never_rewritten() {
    let sb = Sandbox::new("netns");
    let _proxy = fake_proxy(&sb, vec![Ipv4Addr::new(127, 0, 0, 53)]);
    let other = Netns::new(format!("kt-hooktest-other-{}", std::process::id()));
    for ip in ["10.96.0.1/32", "10.244.3.4/32"] {
        run(&["ip", "-n", &other.name, "addr", "add", ip, "dev", "lo"]);
    }
    let (cluster_alias, dns_alias) = (alias([10, 96, 0, 1]), "127.127.53.1");
    // The other namespace's own servers: its "ClusterIP", pod, resolver, and what would be
    // aliases in ktctl's namespace. Outside the hooked cgroup.
    let server = format!(
        r#"
import socket, threading
def tcp(addr, answer):
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(addr); l.listen(8)
    def serve():
        while True:
            c, _ = l.accept(); c.sendall(answer + b"\n"); c.close()
    threading.Thread(target=serve, daemon=True).start()
def udp(addr, answer):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(addr)
    def serve():
        while True:
            _, peer = u.recvfrom(100); u.sendto(answer, peer)
    threading.Thread(target=serve, daemon=True).start()
tcp(("10.96.0.1", 80), b"other-cluster")
tcp(("{cluster_alias}", 80), b"other-alias")
udp(("10.244.3.4", 9000), b"other-pod")
udp(("127.0.0.53", 53), b"other-resolver")
udp(("{dns_alias}", 53), b"other-dns-alias")
print("ready", flush=True)
threading.Event().wait()
"#
    );
    let _server = Background::start(python_in(&other, None, &server));
    let client = format!(
        r#"
import socket, json
out = {{}}
def tcp(host, port):
    s = socket.socket(); s.settimeout(3)
    try:
        s.connect((host, port))
        return {{"line": s.makefile().readline().strip(), "peer": s.getpeername()[:2]}}
    except OSError as e:
        return {{"error": e.errno}}
def udp(host, port):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(3)
    try:
        u.sendto(b"hi", (host, port))
        data, src = u.recvfrom(100)
        return {{"data": data.decode(), "src": src}}
    except OSError as e:
        return {{"error": e.errno}}
out["cluster"] = tcp("10.96.0.1", 80)
out["alias"] = tcp("{cluster_alias}", 80)
out["pod"] = udp("10.244.3.4", 9000)
out["dns"] = udp("127.0.0.53", 53)
out["dns_alias"] = udp("{dns_alias}", 53)
print(json.dumps(out))
"#
    );
    // The hooks are on: the same client in ktctl's namespace is redirected.
    let here = json(&sb.client(&client));
    assert_eq!(here["cluster"]["line"], "orig=10.96.0.1:80", "{here}");
    // In the other namespace, from the same cgroup: nothing rewritten, nothing restored.
    let out = json(&output(python_in(&other, Some(&sb.cgroup), &client)));
    let expect = serde_json::json!({
        "cluster": {"line": "other-cluster", "peer": ["10.96.0.1", 80]},
        "alias": {"line": "other-alias", "peer": [cluster_alias.to_string(), 80]},
        "pod": {"data": "other-pod", "src": ["10.244.3.4", 9000]},
        "dns": {"data": "other-resolver", "src": ["127.0.0.53", 53]},
        "dns_alias": {"data": "other-dns-alias", "src": [dns_alias, 53]},
    });
    assert_eq!(out, expect, "hooks touched another network namespace");
}

/// Regression: with `connect -- CMD`, sk_lookup handed the proxy any connection to an alias
/// in the namespace, so every process on the machine reached the cluster by dialling
/// 127.128.x.y (or ktctl's DNS at 127.127.53.x) directly.
#[test]
#[ignore = "needs root (BPF, namespaces, cgroups): cargo xtask ci runs it"]
fn processes_outside_cmds_cgroup_cannot_reach_the_aliases() {
    let mut sb = Sandbox::nested("guard");
    let parent = sb.parent().clone();
    let cmd_child = sb.sub_cgroup(&sb.cgroup.clone(), "child");
    let _proxy = fake_proxy_guarded(
        &sb,
        vec![Ipv4Addr::new(127, 0, 0, 53)],
        Some(parent.clone()),
    );
    let (cluster_alias, pod_alias) = (alias([10, 96, 0, 1]), alias([10, 244, 3, 4]));
    let script = format!(
        r#"
import socket, json
out = {{}}
def tcp(host, port, family=socket.AF_INET):
    s = socket.socket(family, socket.SOCK_STREAM); s.settimeout(3)
    try:
        s.connect((host, port))
        return {{"line": s.makefile().readline().strip()}}
    except OSError as e:
        return {{"error": e.errno}}
def udp(host, port, connect=False):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(3)
    try:
        if connect:
            u.connect((host, port)); u.send(b"hi")
        else:
            u.sendto(b"hi", (host, port))
        return {{"data": u.recv(100).decode()}}
    except OSError as e:
        return {{"error": e.errno}}
out["cluster"] = tcp("10.96.0.1", 80)
out["alias"] = tcp("{cluster_alias}", 80)
out["alias_mapped"] = tcp("::ffff:{cluster_alias}", 80, socket.AF_INET6)
out["alias_udp"] = udp("{pod_alias}", 9000)
out["alias_udp_connected"] = udp("{pod_alias}", 9000, True)
out["dns_alias"] = udp("127.127.53.1", 53)
out["dns_alias_connected"] = udp("127.127.53.1", 53, True)
out["dns"] = udp("127.0.0.53", 53, True)
print(json.dumps(out))
"#
    );
    let eperm = serde_json::json!({"error": libc::EPERM});
    // In the parent, outside CMD's cgroup: every alias refused, the ClusterIP left alone.
    let outside = json(&sb.client_in(&parent, &script));
    let expect = serde_json::json!({
        "cluster": {"error": libc::ENETUNREACH},
        "alias": eperm,
        "alias_mapped": eperm,
        "alias_udp": eperm,
        "alias_udp_connected": eperm,
        "dns_alias": eperm,
        "dns_alias_connected": eperm,
        "dns": {"error": libc::ECONNREFUSED},
    });
    assert_eq!(outside, expect, "a process outside CMD's cgroup");
    // CMD and its children (also in a cgroup of their own below CMD's) reach everything.
    for cg in [&sb.cgroup, &cmd_child] {
        let inside = json(&sb.client_in(cg, &script));
        let expect = serde_json::json!({
            "cluster": {"line": "orig=10.96.0.1:80"},
            "alias": {"line": "orig=10.96.0.1:80"},
            "alias_mapped": {"line": "orig=10.96.0.1:80"},
            "alias_udp": {"data": "orig=10.244.3.4:9000"},
            "alias_udp_connected": {"data": "orig=10.244.3.4:9000"},
            "dns_alias": {"data": "dns-answer"},
            "dns_alias_connected": {"data": "dns-answer"},
            "dns": {"data": "dns-answer"},
        });
        assert_eq!(inside, expect, "a process in {}", cg.display());
    }
}

/// The ids of the sk_lookup links on the namespace with inode `netns_ino`.
fn sk_lookup_links(netns_ino: u64) -> Vec<u64> {
    let listed = Command::new("bpftool")
        .args(["-j", "link", "show"])
        .output()
        .expect("bpftool");
    assert!(listed.status.success(), "bpftool link show failed");
    let links: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("bpftool json");
    links
        .as_array()
        .expect("a list of links")
        .iter()
        .filter(|l| l["attach_type"] == "sk_lookup" && l["netns_ino"] == netns_ino)
        .filter_map(|l| l["id"].as_u64())
        .collect()
}

fn cgroup_programs(cgroup: &std::path::Path) -> String {
    let listed = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup)
        .output()
        .expect("bpftool");
    String::from_utf8_lossy(&listed.stdout).into_owned()
}

#[test]
#[ignore = "needs root (BPF, namespaces, cgroups): cargo xtask ci runs it"]
fn dropping_the_hooks_detaches_every_program() {
    let sb = Sandbox::nested("detach");
    let ino = sb.netns.inode();
    {
        let _proxy = fake_proxy_guarded(&sb, vec![], Some(sb.parent().clone()));
        let text = cgroup_programs(&sb.cgroup);
        for p in [
            "kt_connect4",
            "kt_connect6",
            "kt_sendmsg4",
            "kt_sendmsg6",
            "kt_recvmsg4",
            "kt_recvmsg6",
            "kt_getpeername4",
            "kt_getpeername6",
        ] {
            assert!(text.contains(p), "{p} not attached:\n{text}");
        }
        let text = cgroup_programs(sb.parent());
        for p in ["kt_guard_conne", "kt_guard_sendm"] {
            assert!(text.contains(p), "{p} not attached to the parent:\n{text}");
        }
        assert_eq!(sk_lookup_links(ino).len(), 1, "sk_lookup not attached");
    }
    let text = cgroup_programs(&sb.cgroup);
    assert!(!text.contains("kt_"), "programs left attached:\n{text}");
    let text = cgroup_programs(sb.parent());
    assert!(!text.contains("kt_"), "guard left attached:\n{text}");
    assert_eq!(
        sk_lookup_links(ino),
        Vec::<u64>::new(),
        "the sk_lookup link outlived the hooks"
    );
}
