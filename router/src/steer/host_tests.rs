//! The sock_addr programs for the node's own sockets, on real sockets (root): the test makes
//! two network namespaces and a child cgroup of its own (removed on drop, also on failure),
//! attaches the programs to that cgroup for sockets of the first namespace, and runs a client
//! (python3) inside them. Cluster-looking addresses exist only inside those namespaces, which
//! have no route anywhere: a connection that is not steered fails with ENETUNREACH.

use std::ffi::CString;
use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use kt_common::steer::{BYPASS_MARK, counter};

use super::*;

const SERVICE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
const DNS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 53);
const TCP_SHADOW: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080);
const UDP_SHADOW: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8081);
const ENETUNREACH: i64 = 101;

/// A network namespace made by the test, deleted when dropped.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Netns {
        let ok = Command::new("ip").args(["netns", "add", &name]).status();
        assert!(ok.is_ok_and(|s| s.success()), "ip netns add {name}");
        let ns = Netns(name);
        let ok = Command::new("ip")
            .args(["-n", &ns.0, "link", "set", "lo", "up"])
            .status();
        assert!(ok.is_ok_and(|s| s.success()), "lo up in {}", ns.0);
        ns
    }

    /// The namespace's cookie, read from a socket made inside it by a thread of its own.
    fn cookie(&self) -> u64 {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let f = fs::File::open(path).expect("netns file");
            // SAFETY: setns on an open namespace file; only this thread moves.
            assert_eq!(
                unsafe { libc::setns(f.as_fd().as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("socket");
            kt_common::bpf::netns_cookie(s.as_fd()).expect("cookie")
        })
        .join()
        .expect("cookie thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A child cgroup of the cgroup v2 root, removed when dropped (its processes have exited by
/// then: the clients are waited for).
struct Cgroup(PathBuf);

impl Cgroup {
    fn new(name: &str) -> Cgroup {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let root = mountinfo
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                let sep = f.iter().position(|x| *x == "-")?;
                (f.get(sep + 1) == Some(&"cgroup2")).then(|| PathBuf::from(f[4]))
            })
            .expect("a cgroup v2 mount");
        let p = root.join(name);
        fs::create_dir(&p).expect("child cgroup");
        Cgroup(p)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

/// Runs `script` with python3 inside `netns` and `cgroup`; its stdout, parsed as JSON.
fn python(netns: &Netns, cgroup: &Cgroup, script: &str) -> serde_json::Value {
    let out = python_command(netns, cgroup, script)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "client output {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The command that runs `script` with python3 inside `netns` and `cgroup`.
fn python_command(netns: &Netns, cgroup: &Cgroup, script: &str) -> Command {
    let procs = CString::new(
        cgroup
            .0
            .join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .expect("path");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &netns.0, "python3", "-c", script]);
    // SAFETY: only async-signal-safe calls between fork and exec (open, write, close), on a
    // path made before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
            libc::close(fd);
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        })
    };
    cmd
}

/// Connects to `addr` with TCP (and `mark`), prints `"connected"` or the errno.
fn try_connect(addr: SocketAddrV4, mark: u32) -> String {
    format!(
        r#"
import json, socket
s = socket.socket()
s.settimeout(2)
if {mark}:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, {mark})
try:
    s.connect(("{ip}", {port}))
    print(json.dumps("connected"))
except OSError as e:
    print(json.dumps(e.errno))
"#,
        ip = addr.ip(),
        port = addr.port()
    )
}

/// The node's sockets: TCP (IPv4 and IPv4-mapped IPv6) and UDP to the Service reach the
/// shadows and see the Service's address as their peer; the shadow sees the client.
const STEERED: &str = r#"
import json, socket
out = {}
srv = socket.socket()
srv.bind(("127.0.0.1", 8080))
srv.listen()
c = socket.create_connection(("10.96.0.10", 80), timeout=2)
a, peer = srv.accept()
out["tcp_peer"] = list(c.getpeername())
out["shadow_saw"] = [peer[0], peer[1] == c.getsockname()[1]]
c6 = socket.socket(socket.AF_INET6)
c6.settimeout(2)
c6.connect(("::ffff:10.96.0.10", 80))
srv.accept()
out["tcp6_peer"] = list(c6.getpeername()[:2])
shadow = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
shadow.bind(("127.0.0.1", 8081))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(2)
u.sendto(b"query", ("10.96.0.10", 53))
data, frm = shadow.recvfrom(100)
shadow.sendto(b"answer:" + data, frm)
data, frm = u.recvfrom(100)
out["udp"] = [data.decode(), list(frm)]
print(json.dumps(out))
"#;

#[test]
#[ignore = "needs root: loads BPF programs, makes namespaces and a cgroup"]
fn node_sockets_reach_the_shadow_and_see_the_address_they_called() {
    let tag = std::process::id();
    let node = Netns::new(format!("kt-steertest-node-{tag}"));
    let pod = Netns::new(format!("kt-steertest-pod-{tag}"));
    let cgroup = Cgroup::new(&format!("kt-steertest-{tag}"));
    let mut s = Steering::load().expect("load");
    s.steer(SERVICE, Proto::Tcp, TCP_SHADOW).unwrap();
    s.steer(DNS, Proto::Udp, UDP_SHADOW).unwrap();
    s.attach_host(&cgroup.0, node.cookie())
        .expect("attach to the cgroup");

    let out = python(&node, &cgroup, STEERED);
    assert_eq!(
        out["tcp_peer"],
        serde_json::json!(["10.96.0.10", 80]),
        "{out}"
    );
    assert_eq!(
        out["shadow_saw"],
        serde_json::json!(["127.0.0.1", true]),
        "{out}"
    );
    assert_eq!(
        out["tcp6_peer"],
        serde_json::json!(["::ffff:10.96.0.10", 80]),
        "{out}"
    );
    assert_eq!(
        out["udp"],
        serde_json::json!(["answer:query", ["10.96.0.10", 53]]),
        "{out}"
    );
    let c = s.counters().unwrap();
    assert_eq!(c[counter::HOST_STEERED as usize], 3, "{c:?}");
    // getpeername() twice (TCP over IPv4 and IPv6), recvfrom() once, and whatever python
    // asks itself.
    assert!(c[counter::HOST_RESTORED as usize] >= 3, "{c:?}");

    // Not steered: another address, a socket marked as the router's own, a socket of
    // another namespace (a pod's: the tc programs' business) in the same cgroup.
    let other = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 11), 80);
    assert_eq!(python(&node, &cgroup, &try_connect(other, 0)), ENETUNREACH);
    assert_eq!(
        python(&node, &cgroup, &try_connect(SERVICE, BYPASS_MARK)),
        ENETUNREACH
    );
    assert_eq!(python(&pod, &cgroup, &try_connect(SERVICE, 0)), ENETUNREACH);

    // The kubelet's cgroup (exempt): its probes reach the pods they name.
    let kubelet = Cgroup(cgroup.0.join("kubelet"));
    fs::create_dir(&kubelet.0).expect("kubelet cgroup");
    s.exempt_cgroup(&kubelet.0).unwrap();
    assert_eq!(
        python(&node, &kubelet, &try_connect(SERVICE, 0)),
        ENETUNREACH
    );
    drop(kubelet);

    // Unsteered, and detached: the Service's address is what it is again.
    s.unsteer(SERVICE, Proto::Tcp).unwrap();
    assert_eq!(
        python(&node, &cgroup, &try_connect(SERVICE, 0)),
        ENETUNREACH
    );
    s.steer(SERVICE, Proto::Tcp, TCP_SHADOW).unwrap();
    s.detach_host();
    assert_eq!(
        python(&node, &cgroup, &try_connect(SERVICE, 0)),
        ENETUNREACH
    );
    assert_eq!(s.counters().unwrap()[counter::HOST_STEERED as usize], 3);
}

/// A node connection held open: the shadow (standing for the node's mesh proxy) accepts
/// it, prints the caller's address, and waits for its stdin to close.
const HELD: &str = r#"
import json, socket, sys
srv = socket.socket()
srv.bind(("127.0.0.1", 8080))
srv.listen()
c = socket.create_connection(("10.96.0.10", 80), timeout=2)
a, peer = srv.accept()
print(json.dumps(list(peer)), flush=True)
sys.stdin.read()
"#;

#[test]
#[ignore = "needs root: loads BPF programs, makes namespaces and a cgroup"]
fn the_original_destination_of_a_node_connection_is_found_by_its_socket() {
    use std::io::BufRead;
    let tag = std::process::id();
    let node = Netns::new(format!("kt-steertest-held-{tag}"));
    let cgroup = Cgroup::new(&format!("kt-steertest-held-{tag}"));
    let mut s = Steering::load().expect("load");
    s.steer(SERVICE, Proto::Tcp, TCP_SHADOW).unwrap();
    s.attach_host(&cgroup.0, node.cookie())
        .expect("attach to the cgroup");
    let reader = s.flow_reader().expect("reader");

    let mut child = python_command(&node, &cgroup, HELD)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the caller's address");
    let (ip, port): (Ipv4Addr, u16) =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("caller address {e}: {line:?}"));
    let caller = SocketAddrV4::new(ip, port);
    // The proxy asks from its own namespace: the node's.
    let path = format!("/run/netns/{}", node.0);
    let (found, unknown) = std::thread::scope(|sc| {
        sc.spawn(|| {
            let f = fs::File::open(&path).expect("netns file");
            // SAFETY: setns on an open namespace file; only this thread moves.
            assert_eq!(
                unsafe { libc::setns(f.as_fd().as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            let other = SocketAddrV4::new(ip, port.wrapping_add(1).max(1));
            (
                reader.node_original(caller, TCP_SHADOW),
                reader.node_original(other, TCP_SHADOW),
            )
        })
        .join()
        .expect("lookup thread")
    });
    drop(child.stdin.take());
    let status = child.wait().expect("python3");
    assert!(status.success(), "client failed");
    assert_eq!(found, Some(SERVICE), "the address the caller dialled");
    assert_eq!(unknown, None, "no socket, no original");
    // The pods' flow map knows nothing of a node connection.
    assert_eq!(reader.original(caller, TCP_SHADOW), None);
}
