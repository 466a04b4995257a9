//! The router DaemonSet (deploy/router.yaml) and `exchange --mode ebpf` end to end: steering
//! inside the nodes, for callers on the other node (a pod, and a hostNetwork pod) by
//! ClusterIP, by name and by pod IP, with the Service and its Deployment untouched; installed
//! and removed with kubectl alone.

mod common;

use std::time::Duration;

use common::*;
use kt_testbed::Machine;

const BANNER: &str = "Now all request to service 'nginx' will be redirected to local";
/// A client pod on the node the nginx pod is not on.
const FAR: &str = "e2e-far-client";
/// A hostNetwork client pod on that node (its sockets are the node's).
const HOST: &str = "e2e-host-client";

fn manifests() -> String {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/router.yaml")
        .display()
        .to_string()
}

fn resource_version(kind: &str) -> String {
    kubectl(&[
        "get",
        kind,
        "nginx",
        "-o",
        "jsonpath={.metadata.resourceVersion}",
    ])
}

/// The client pods (one in a network namespace of its own, one hostNetwork), on the node the
/// nginx pod is not on.
fn far_clients() {
    let nginx_node = kubectl(&[
        "get",
        "pod",
        "-l",
        "app=nginx",
        "-o",
        "jsonpath={.items[0].spec.nodeName}",
    ]);
    let nodes = kubectl(&["get", "nodes", "-o", "jsonpath={.items[*].metadata.name}"]);
    let other = nodes
        .split_whitespace()
        .find(|n| *n != nginx_node)
        .expect("a second node")
        .to_string();
    let host = r#""hostNetwork":true,"dnsPolicy":"ClusterFirstWithHostNet""#;
    for (name, extra) in [(FAR, ""), (HOST, host)] {
        let exists = run_in(Machine::Laptop, &["kubectl", "get", "pod", name])
            .status
            .success();
        if !exists {
            let sep = if extra.is_empty() { "" } else { "," };
            let overrides = format!(r#"{{"spec":{{"nodeName":"{other}"{sep}{extra}}}}}"#);
            kubectl(&[
                "run",
                name,
                "--image=busybox:1",
                "--restart=Never",
                &format!("--overrides={overrides}"),
                "--",
                "sleep",
                "infinity",
            ]);
        }
    }
    for name in [FAR, HOST] {
        kubectl(&[
            "wait",
            &format!("pod/{name}"),
            "--for=condition=Ready",
            "--timeout=60s",
        ]);
    }
}

/// What a client pod gets from `url` (empty on failure).
fn from(client: &str, url: &str) -> String {
    from_with(client, url, &[])
}

/// What a client pod gets from `url` with curl's `extra` arguments.
fn from_with(client: &str, url: &str, extra: &[&str]) -> String {
    let mut args = vec!["kubectl", "exec", client, "--", "curl", "-sS", "-m", "3"];
    args.extend_from_slice(extra);
    args.push(url);
    text(&run_in(Machine::Laptop, &args))
}

/// Applies deploy/router.yaml and waits until the router runs on every node.
fn install_router() {
    kubectl(&["apply", "-f", &manifests()]);
    kubectl(&[
        "-n",
        "kt-system",
        "rollout",
        "status",
        "ds/kt-router",
        "--timeout=120s",
    ]);
}

/// The three ways a caller reaches nginx: ClusterIP, name, pod IP.
fn urls() -> [String; 3] {
    let cluster_ip = kubectl(&["get", "svc", "nginx", "-o", "jsonpath={.spec.clusterIP}"]);
    [
        format!("http://{cluster_ip}:80"),
        "http://nginx:80".to_string(),
        format!("http://{}:80", nginx_pod_ip()),
    ]
}

/// Calls `f(client, url)` for both clients and the three ways of reaching nginx.
fn each_caller(mut f: impl FnMut(&str, &str)) {
    let urls = urls();
    for client in [FAR, HOST] {
        for url in &urls {
            f(client, url);
        }
    }
}

/// Both clients get `want` by ClusterIP, name and pod IP, with curl's `extra` arguments.
fn all_get_with(what: &str, extra: &[&str], want: &str, timeout: Duration) {
    each_caller(|client, url| {
        eventually(&format!("{url} to give {client} {what}"), timeout, || {
            from_with(client, url, extra) == want
        })
    });
}

fn all_get(what: &str, want: &str, timeout: Duration) {
    all_get_with(what, &[], want, timeout);
}

const SECOND_PAGE: &str = "kt-connect cluster nginx service, second pod";

/// A second pod behind the nginx Service (its label, not its Deployment's), serving
/// [`SECOND_PAGE`]; deleted when dropped.
struct SecondNginx {
    ip: String,
}

impl SecondNginx {
    const NAME: &str = "e2e-nginx-second";

    fn start() -> SecondNginx {
        kubectl(&[
            "run",
            Self::NAME,
            "--image=nginx:alpine",
            "--restart=Never",
            "--labels=app=nginx,kt-e2e-second=1",
            "--port=80",
        ]);
        // The guard first: a failed wait or exec still deletes the pod.
        let mut s = SecondNginx { ip: String::new() };
        kubectl(&[
            "wait",
            &format!("pod/{}", Self::NAME),
            "--for=condition=Ready",
            "--timeout=90s",
        ]);
        kubectl(&[
            "exec",
            Self::NAME,
            "--",
            "/bin/sh",
            "-c",
            &format!("echo \"{SECOND_PAGE}\" > /usr/share/nginx/html/index.html"),
        ]);
        s.ip = kubectl(&["get", "pod", Self::NAME, "-o", "jsonpath={.status.podIP}"]);
        s
    }
}

impl Drop for SecondNginx {
    fn drop(&mut self) {
        let _ = run_in(
            Machine::Laptop,
            &[
                "kubectl",
                "delete",
                "pod",
                Self::NAME,
                "--wait=true",
                "--ignore-not-found",
            ],
        );
    }
}

fn router_logs() -> String {
    kubectl(&[
        "-n",
        "kt-system",
        "logs",
        "-l",
        "app.kubernetes.io/name=kt-router",
        "--tail=-1",
    ])
}

/// The router's programs (kt_tc_*, kt_host_*) loaded anywhere on this machine (every node is
/// a namespace of it).
fn router_programs_loaded() -> usize {
    let out = std::process::Command::new("bpftool")
        .args(["prog", "show"])
        .output()
        .expect("bpftool");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("kt_tc_") || l.contains("kt_host_"))
        .count()
}

/// One HTTP/1.1 keep-alive connection from a client pod to `host:80`: every [`KeepAlive::get`]
/// sends a request on it and returns the body (empty once the connection failed).
struct KeepAlive {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    out: std::io::BufReader<std::process::ChildStdout>,
}

/// Reads a line from stdin, then sends a request on the one connection and prints the body.
const KEEP_ALIVE: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=10)
f = s.makefile("rb")
for _ in sys.stdin:
    s.sendall(b"GET / HTTP/1.1\r\nHost: nginx\r\n\r\n")
    length = 0
    while True:
        line = f.readline()
        if not line:
            sys.exit("the connection closed")
        if line.strip() == b"":
            break
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    print(f.read(length).decode().strip(), flush=True)
"#;

impl KeepAlive {
    fn open(client: &str, host: &str) -> KeepAlive {
        use std::process::Stdio;
        let tb = kt_testbed::Testbed::default();
        let mut cmd =
            kt_testbed::machine::command(&tb.layout, Machine::Laptop, "kubectl").expect("command");
        cmd.args([
            "exec", "-i", client, "--", "python3", "-c", KEEP_ALIVE, host,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
        let mut child = cmd.spawn().expect("kubectl exec");
        let stdin = child.stdin.take().expect("stdin");
        let out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        KeepAlive { child, stdin, out }
    }

    fn get(&mut self) -> String {
        use std::io::{BufRead, Write};
        if writeln!(self.stdin)
            .and_then(|()| self.stdin.flush())
            .is_err()
        {
            return String::new();
        }
        let mut line = String::new();
        let _ = self.out.read_line(&mut line);
        line.trim().to_string()
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The routers' pin folders on the nodes' own bpf filesystems that exist.
fn router_pins() -> Vec<std::path::PathBuf> {
    let layout = kt_testbed::Testbed::default().layout;
    (1..=2)
        .map(|n| layout.bpffs(Machine::Node(n)).join("kt-router"))
        .filter(|p| p.exists())
        .collect()
}

#[test]
#[ignore = "needs root and the testbed: cargo xtask e2e runs it"]
/// Without the router, `--mode ebpf` is a usage error naming the manifest; with it, callers
/// on the other node (a pod and a hostNetwork pod) get the local page by ClusterIP, name and pod IP while the Service and
/// the Deployment keep their resourceVersion; a router pod replaced keeps steering, and a
/// connection steered before keeps its shadow; Ctrl-C and `kill -9` (after `--grace`) end it;
/// `kubectl delete -f` leaves no program loaded and no flows pinned.
fn exchange_in_ebpf_mode_steers_inside_the_nodes_and_changes_nothing() {
    let _tb = testbed();
    seed_nginx();
    far_clients();
    let _local = LocalServer::start(80, LOCAL);
    all_get("the cluster page", PAGE, Duration::from_secs(30));

    // No router (an earlier run's removed first): refused before anything is created.
    kubectl(&[
        "delete",
        "-f",
        &manifests(),
        "--ignore-not-found=true",
        "--wait=true",
    ]);
    let (code, out) = ktctl_exit(&["exchange", "nginx", "--expose", "80", "--mode", "ebpf"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("deploy/router.yaml") && out.contains("not installed"),
        "{out}"
    );

    install_router();
    let (svc_rv, deploy_rv) = (resource_version("svc"), resource_version("deploy"));

    let mut k = Ktctl::spawn(&["exchange", "nginx", "--expose", "80", "--mode", "ebpf"]);
    k.wait_for(BANNER, Duration::from_secs(120));
    all_get("the local page", LOCAL, Duration::from_secs(20));
    assert_eq!(
        (resource_version("svc"), resource_version("deploy")),
        (svc_rv.clone(), deploy_rv.clone()),
        "the Service and the Deployment are untouched"
    );
    let (code, bird) = ktctl_exit(&["birdseye"]);
    assert_eq!(code, Some(0), "{bird}");
    assert!(
        bird.contains("> kt-node-1: ready")
            && bird.contains("> kt-node-2: ready")
            && bird.contains("ready on all 2 node(s)"),
        "birdseye shows the router per node:\n{bird}"
    );
    let logs = router_logs();
    assert!(
        logs.lines()
            .any(|l| l.contains(r#""change":"steer""#) && l.contains("default/nginx")),
        "one JSON line per steering change:\n{logs}"
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("never steered") && l.contains("system.slice/kubelet.service")),
        "the kubelet's probes and port-forwards are left alone:\n{logs}"
    );

    // A router pod replaced (a rollout, an eviction): the new one steers again by itself, and
    // a connection steered before keeps its shadow (the flows stay pinned on the node).
    let cluster_ip = kubectl(&["get", "svc", "nginx", "-o", "jsonpath={.spec.clusterIP}"]);
    let mut kept = KeepAlive::open(FAR, &cluster_ip);
    assert_eq!(kept.get(), LOCAL, "a keep-alive connection, steered");
    kubectl(&[
        "-n",
        "kt-system",
        "delete",
        "pod",
        "-l",
        "app.kubernetes.io/name=kt-router",
        "--wait=true",
    ]);
    kubectl(&[
        "-n",
        "kt-system",
        "rollout",
        "status",
        "ds/kt-router",
        "--timeout=120s",
    ]);
    all_get(
        "the local page after the routers came back",
        LOCAL,
        Duration::from_secs(20),
    );
    assert_eq!(
        kept.get(),
        LOCAL,
        "the connection steered before the routers were replaced keeps its shadow:\n{}",
        router_logs()
    );
    drop(kept);
    let logs = router_logs();
    assert!(
        logs.contains("taking over the flows an earlier router left"),
        "the new routers took the flows over:\n{logs}"
    );

    // Ctrl-C: new connections reach nginx again.
    assert_eq!(k.stop(libc::SIGINT, Duration::from_secs(30)), Some(0));
    all_get(
        "the cluster page after Ctrl-C",
        PAGE,
        Duration::from_secs(20),
    );

    // kill -9: the shadow ends the session after --grace, and steering with it.
    let mut k = Ktctl::spawn(&[
        "exchange", "nginx", "--expose", "80", "--mode", "ebpf", "--grace", "5",
    ]);
    k.wait_for(BANNER, Duration::from_secs(120));
    all_get("the local page again", LOCAL, Duration::from_secs(20));
    k.stop(libc::SIGKILL, Duration::from_secs(10));
    all_get(
        "the cluster page after kill -9",
        PAGE,
        Duration::from_secs(5 + 15),
    );
    assert_eq!(
        (resource_version("svc"), resource_version("deploy")),
        (svc_rv, deploy_rv),
        "the Service and the Deployment were never touched"
    );

    // Uninstall: nothing of the router stays loaded on any node.
    assert!(
        router_programs_loaded() > 0,
        "the routers' programs are loaded"
    );
    assert_eq!(router_pins().len(), 2, "each node's router pins its flows");
    kubectl(&["delete", "-f", &manifests(), "--wait=true"]);
    eventually(
        "the routers' programs to go",
        Duration::from_secs(60),
        || router_programs_loaded() == 0,
    );
    assert_eq!(
        router_pins(),
        Vec::<std::path::PathBuf>::new(),
        "an uninstall leaves no pinned flows on the nodes"
    );
}

#[test]
#[ignore = "needs root and the testbed: cargo xtask e2e runs it"]
/// `mesh --mode ebpf`: callers on the other node (a pod and a hostNetwork pod), by ClusterIP,
/// name and pod IP, get the local page with the developer's header and nginx's without it,
/// through the mesh proxy of their own node; the Service and the Deployment keep their
/// resourceVersion; Ctrl-C ends the route.
fn mesh_in_ebpf_mode_routes_by_header_inside_the_nodes() {
    let _tb = testbed();
    seed_nginx();
    far_clients();
    let _local = LocalServer::start(80, LOCAL);
    install_router();
    let (svc_rv, deploy_rv) = (resource_version("svc"), resource_version("deploy"));

    let mut k = Ktctl::spawn(&[
        "mesh",
        "nginx",
        "--expose",
        "80",
        "--mode",
        "ebpf",
        "--versionMark",
        "dev",
    ]);
    k.wait_for(
        "Now you can access your service by header 'VERSION: dev'",
        Duration::from_secs(120),
    );
    let header = ["-H", "version: dev"];
    all_get_with(
        "the local page with the header",
        &header,
        LOCAL,
        Duration::from_secs(20),
    );
    each_caller(|client, url| {
        assert_eq!(
            from(client, url),
            PAGE,
            "{client}: {url} without the header reaches nginx"
        );
        assert_eq!(
            from_with(client, url, &["-H", "version: other"]),
            PAGE,
            "{client}: {url} with another value reaches nginx"
        );
    });
    assert_eq!(
        (resource_version("svc"), resource_version("deploy")),
        (svc_rv.clone(), deploy_rv.clone()),
        "the Service and the Deployment are untouched"
    );
    let logs = router_logs();
    assert!(
        logs.lines().any(|l| l.contains(r#""change":"route""#)
            && l.contains("default/nginx")
            && l.contains(r#""value":"dev""#)),
        "one JSON line per route:\n{logs}"
    );

    // A second pod behind the Service: a request without the header goes to the pod its
    // caller dialled, not to whichever pod the ClusterIP would pick, for the hostNetwork
    // caller (found by its socket) as for the pod (found by its flow).
    let second = SecondNginx::start();
    let first = format!(
        "http://{}:80",
        kubectl(&[
            "get",
            "pod",
            "-l",
            "app=nginx,!kt-e2e-second",
            "-o",
            "jsonpath={.items[0].status.podIP}",
        ])
    );
    let second_url = format!("http://{}:80", second.ip);
    for client in [FAR, HOST] {
        eventually(
            &format!("{second_url} (the new endpoint) to be meshed for {client}"),
            Duration::from_secs(30),
            || from_with(client, &second_url, &header) == LOCAL,
        );
        for _ in 0..8 {
            assert_eq!(
                from(client, &second_url),
                SECOND_PAGE,
                "{client}: {second_url}"
            );
            assert_eq!(from(client, &first), PAGE, "{client}: {first}");
        }
    }
    drop(second);

    // Ctrl-C: the route goes with the shadow; the header reaches nginx.
    assert_eq!(k.stop(libc::SIGINT, Duration::from_secs(30)), Some(0));
    all_get_with(
        "nginx with the header after Ctrl-C",
        &header,
        PAGE,
        Duration::from_secs(20),
    );
    assert_eq!(
        (resource_version("svc"), resource_version("deploy")),
        (svc_rv, deploy_rv),
        "the Service and the Deployment were never touched"
    );
    kubectl(&["delete", "-f", &manifests(), "--wait=true"]);
}
