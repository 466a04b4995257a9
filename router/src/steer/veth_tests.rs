//! The tc programs on real veths (root), attached both ways a node can have them (TCX links,
//! netlink filters on a clsact qdisc), with real TCP and UDP through a routing namespace: the
//! test makes three network namespaces of its own (a client pod, the node, a shadow pod),
//! joined by veths whose node ends carry the programs, and removes them on drop, also on
//! failure. The veths keep their checksum offloads, as a node's do (offload hides checksum
//! bugs from a test that only looks at packets; a real receiver drops a bad segment). The
//! Service's address exists nowhere: only the rewrite makes a connection to it work.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd};
use std::process::{Child, Command, Stdio};

use super::*;

const SERVICE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
const DNS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 53);
const SHADOW_TCP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 2), 8080);
const SHADOW_UDP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 2), 8081);

/// Network namespaces and veths made by the test; deleting the namespaces deletes the veths.
struct Net {
    pod: String,
    node: String,
    shadow: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Net {
    fn new(tag: &str) -> Net {
        let name = |role: &str| format!("kt-vt-{}-{tag}-{role}", std::process::id());
        let net = Net {
            pod: name("pod"),
            node: name("node"),
            shadow: name("shadow"),
        };
        for ns in [&net.pod, &net.node, &net.shadow] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        for (ns, host, addr, gw) in [
            (&net.pod, "hpod", "10.244.1.2/24", "10.244.1.1"),
            (&net.shadow, "hshadow", "10.244.2.2/24", "10.244.2.1"),
        ] {
            ip(&[
                "-n", &net.node, "link", "add", host, "type", "veth", "peer", "name", "eth0",
                "netns", ns,
            ]);
            ip(&["-n", ns, "addr", "add", addr, "dev", "eth0"]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
            ip(&["-n", ns, "route", "add", "default", "via", gw]);
            ip(&[
                "-n",
                &net.node,
                "addr",
                "add",
                &format!("{gw}/24"),
                "dev",
                host,
            ]);
            ip(&["-n", &net.node, "link", "set", host, "up"]);
        }
        let ok = Command::new("ip")
            .args([
                "netns",
                "exec",
                &net.node,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ])
            .status();
        assert!(ok.is_ok_and(|s| s.success()), "forwarding in {}", net.node);
        net
    }

    /// Runs `f` on a thread of its own inside the node's namespace (interface names and
    /// netlink sockets are per namespace; only that thread moves).
    fn in_node<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.node);
        std::thread::scope(|s| {
            s.spawn(move || {
                let ns = std::fs::File::open(path).expect("netns file");
                // SAFETY: setns on an open namespace file; it moves only this thread.
                assert_eq!(
                    unsafe { libc::setns(ns.as_fd().as_raw_fd(), libc::CLONE_NEWNET) },
                    0,
                    "setns"
                );
                f()
            })
            .join()
            .expect("node thread")
        })
    }

    /// `tc filter show` of the pod's veth, node side, in `dir` (ingress or egress).
    fn filters(&self, dir: &str) -> String {
        let out = Command::new("tc")
            .args(["-n", &self.node, "filter", "show", "dev", "hpod", dir])
            .output()
            .expect("tc");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.pod, &self.node, &self.shadow] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The shadow: echoes one TCP connection (prefixed by the peer it saw) and answers one UDP
/// datagram; ended (by its pid) when dropped.
struct Shadow(Child);

const SHADOW: &str = r#"
import json, socket, sys
t = socket.socket()
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", 8080))
t.listen()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", 8081))
print("ready", flush=True)
a, peer = t.accept()
data = b"".join(iter(lambda: a.recv(65536), b""))
a.sendall(json.dumps(list(peer)).encode() + b"\n" + data)
a.close()
d, frm = u.recvfrom(100)
u.sendto(b"answer:" + d, frm)
"#;

impl Shadow {
    fn start(net: &Net) -> Shadow {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &net.shadow, "python3", "-c", SHADOW])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("shadow's first line");
        assert_eq!(line.trim(), "ready");
        Shadow(child)
    }
}

impl Drop for Shadow {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The pod's client: 256 KiB over TCP to the Service (many segments, offloaded checksums)
/// echoed back, and a UDP query to the Service's DNS port; what it saw, as JSON.
const CLIENT: &str = r#"
import json, socket
out = {}
payload = bytes(range(256)) * 1024
c = socket.create_connection(("10.96.0.10", 80), timeout=5)
out["peer"] = list(c.getpeername())
c.sendall(payload)
c.shutdown(socket.SHUT_WR)
got = b"".join(iter(lambda: c.recv(65536), b""))
line, rest = got.split(b"\n", 1)
out["shadow_saw"] = json.loads(line)[0]
out["echoed"] = rest == payload
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(5)
u.sendto(b"query", ("10.96.0.10", 53))
data, frm = u.recvfrom(100)
out["udp"] = [data.decode(), list(frm)]
print(json.dumps(out))
"#;

fn client(net: &Net) -> serde_json::Value {
    let out = Command::new("ip")
        .args(["netns", "exec", &net.pod, "python3", "-c", CLIENT])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("client's JSON")
}

/// Steering whose programs are dropped inside the node's namespace, also on failure: a
/// netlink filter is detached by its interface's index, which in another namespace names
/// another interface.
struct NodeSteering<'a> {
    net: &'a Net,
    s: Option<Steering>,
}

impl NodeSteering<'_> {
    fn get(&mut self) -> &mut Steering {
        self.s.as_mut().expect("steering")
    }

    /// Attaches to both veths' node ends inside the node's namespace.
    fn attach_both(&mut self) -> [Attached; 2] {
        let s = self.s.as_mut().expect("steering");
        self.net.in_node(|| {
            ["hpod", "hshadow"].map(|iface| {
                s.attach(iface)
                    .unwrap_or_else(|e| panic!("attach {iface}: {e:#}"))
            })
        })
    }
}

impl Drop for NodeSteering<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.s.take() {
            self.net.in_node(move || drop(s));
        }
    }
}

/// Programs loaded for `net`, steering the Service's TCP and DNS ports to the shadow.
fn steered(net: &Net, how: TcAttach) -> NodeSteering<'_> {
    let mut s = Steering::load().expect("load");
    s.set_tc_attach(how);
    s.steer(SERVICE, Proto::Tcp, SHADOW_TCP).expect("steer tcp");
    s.steer(DNS, Proto::Udp, SHADOW_UDP).expect("steer udp");
    NodeSteering { net, s: Some(s) }
}

/// A connection through both attach kinds: the client reaches the shadow through the
/// Service's address, sees that address as its peer, and its 256 KiB come back intact.
fn traffic_flows(how: TcAttach, tag: &str) {
    let net = Net::new(tag);
    let mut s = steered(&net, how);
    let attached = s.attach_both();
    let _shadow = Shadow::start(&net);
    let got = client(&net);
    assert_eq!(got["peer"], serde_json::json!(["10.96.0.10", 80]), "{got}");
    assert_eq!(got["shadow_saw"], "10.244.1.2", "{got}");
    assert_eq!(got["echoed"], true, "256 KiB echoed intact: {got}");
    assert_eq!(
        got["udp"],
        serde_json::json!(["answer:query", ["10.96.0.10", 53]]),
        "{got}"
    );
    let netlink = net.filters("ingress").contains("kt_tc_ingress");
    assert_eq!(
        netlink,
        how == TcAttach::Netlink,
        "netlink filters only when asked for: {}",
        net.filters("ingress")
    );
    let s = s.get();
    net.in_node(|| {
        for a in attached {
            s.detach(a).expect("detach");
        }
    });
    assert!(
        !net.filters("ingress").contains("kt_tc") && !net.filters("egress").contains("kt_tc"),
        "detached"
    );
}

#[test]
#[ignore = "needs root: loads BPF programs, makes namespaces and veths"]
fn tcx_links_carry_real_tcp_and_udp_to_the_shadow() {
    traffic_flows(TcAttach::Tcx, "tcx");
}

#[test]
#[ignore = "needs root: loads BPF programs, makes namespaces and veths"]
fn clsact_filters_carry_real_tcp_and_udp_to_the_shadow() {
    traffic_flows(TcAttach::Netlink, "nl");
}

#[test]
#[ignore = "needs root: loads BPF programs, makes namespaces and veths"]
fn a_router_replaces_the_clsact_filters_a_killed_one_left() {
    let net = Net::new("dead");
    // A router killed without detaching: its filters stay, with maps nobody updates (its
    // programs are leaked here, as a killed process leaves them to the filters).
    let mut dead = Steering::load().expect("load");
    dead.set_tc_attach(TcAttach::Netlink);
    net.in_node(|| dead.attach("hpod").expect("attach"));
    std::mem::forget(dead);
    assert!(
        net.filters("ingress").contains("kt_tc_ingress"),
        "left behind"
    );
    let mut s = steered(&net, TcAttach::Netlink);
    s.attach_both();
    for dir in ["ingress", "egress"] {
        let f = net.filters(dir);
        assert_eq!(
            f.lines()
                .filter(|l| l.contains(&format!("kt_tc_{dir}")))
                .count(),
            1,
            "one filter of ours on {dir}:\n{f}"
        );
    }
    let _shadow = Shadow::start(&net);
    let got = client(&net);
    assert_eq!(got["peer"], serde_json::json!(["10.96.0.10", 80]), "{got}");
    assert_eq!(got["echoed"], true, "{got}");
}
