//! The eBPF programs in the kernel, on real sockets: each test makes a network namespace and a
//! child cgroup of its own (removed on drop, also on failure), attaches the hooks there, and
//! runs a client process (python3) inside both. Needs root: `cargo xtask ci` runs these.

use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;

use ktctl::bpf::{HookConfig, Hooks};
use ktctl::cidr::Plan;
use ktctl::proxy::OrigDst;
use tokio::io::AsyncWriteExt;

/// A network namespace and a child cgroup, removed when dropped.
struct Sandbox {
    netns: String,
    cgroup: PathBuf,
}

impl Sandbox {
    fn new(tag: &str) -> Sandbox {
        let netns = format!("kt-hooktest-{tag}-{}", std::process::id());
        run(&["ip", "netns", "add", &netns]);
        run(&["ip", "-n", &netns, "link", "set", "lo", "up"]);
        let cgroup = ktctl::cgroup::v2_root().expect("cgroup v2").join(&netns);
        fs::create_dir(&cgroup).expect("child cgroup");
        Sandbox { netns, cgroup }
    }

    fn netns_file(&self) -> fs::File {
        fs::File::open(format!("/run/netns/{}", self.netns)).expect("netns file")
    }

    /// A python3 client that starts inside the namespace and the cgroup.
    fn python(&self, script: &str) -> Command {
        let ns = self.netns_file();
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(self.cgroup.join("cgroup.procs"))
            .expect("cgroup.procs");
        let mut cmd = Command::new("python3");
        cmd.arg("-c")
            .arg(script)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        use std::os::unix::process::CommandExt;
        // SAFETY: setns and write on descriptors opened before the fork; the closure owns
        // them, so they live as long as the command.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0
                    || libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Runs a python3 client inside the namespace and the cgroup; returns its stdout.
    fn client(&self, script: &str) -> String {
        let out = self.python(script).output().expect("python3 runs");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "client failed: {}\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Ok(pids) = fs::read_to_string(self.cgroup.join("cgroup.procs")) {
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: kill(2) on the clients this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        for _ in 0..100 {
            if fs::remove_dir(&self.cgroup).is_ok() || !self.cgroup.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
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

fn fake_proxy(sb: &Sandbox, resolvers: Vec<Ipv4Addr>, self_tgid: u32) -> FakeProxy {
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
                self_tgid,
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
    let _proxy = fake_proxy(&sb, vec![Ipv4Addr::new(127, 0, 0, 53)], std::process::id());
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

#[test]
#[ignore = "needs root (BPF, namespaces, cgroups): cargo xtask ci runs it"]
fn sockets_of_ktctls_own_process_are_never_redirected() {
    let sb = Sandbox::new("bypass");
    // The client announces its pid and waits; the hooks then treat it as ktctl itself.
    let script = r#"
import os, socket, sys, json
print(os.getpid(), flush=True)
sys.stdin.readline()
s = socket.socket(); s.settimeout(3)
try:
    s.connect(("10.96.0.1", 80)); print(json.dumps({"connected": True}))
except OSError as e:
    print(json.dumps({"error": e.errno}))
"#;
    let mut child = sb
        .python(script)
        .stdin(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).expect("pid line");
    let pid: u32 = line.trim().parse().expect("pid");
    let _proxy = fake_proxy(&sb, vec![], pid);
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("go");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).expect("output");
    assert!(child.wait().expect("wait").success());
    let out = json(&rest);
    assert_eq!(
        out["error"],
        libc::ENETUNREACH,
        "ktctl's own connect was redirected: {out}"
    );
}

#[test]
#[ignore = "needs root (BPF, namespaces, cgroups): cargo xtask ci runs it"]
fn dropping_the_hooks_detaches_every_program() {
    let sb = Sandbox::new("detach");
    {
        let _proxy = fake_proxy(&sb, vec![], std::process::id());
        let listed = Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(&sb.cgroup)
            .output()
            .expect("bpftool");
        let text = String::from_utf8_lossy(&listed.stdout);
        for p in [
            "kt_connect4",
            "kt_connect6",
            "kt_sendmsg4",
            "kt_recvmsg4",
            "kt_getpeername4",
            "kt_getpeername6",
        ] {
            assert!(text.contains(p), "{p} not attached:\n{text}");
        }
    }
    let listed = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&sb.cgroup)
        .output()
        .expect("bpftool");
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(!text.contains("kt_"), "programs left attached:\n{text}");
}
