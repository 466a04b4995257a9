//! The testbed itself (issue: testbed acceptance): the seed walkthrough's cluster half, works
//! verbatim with the testbed's kubectl, across two nodes, and `down` leaves nothing behind.

mod common;

use std::time::Duration;

use common::*;
use kt_testbed::{Machine, Testbed, UpOptions};

/// A node bpf filesystem where another checkout's testbed keeps node 2's (under a temporary
/// folder), as a run of it cut short would leave; unmounted and removed on drop if still there.
struct OtherCheckoutBpffs(std::path::PathBuf, std::path::PathBuf);

impl OtherCheckoutBpffs {
    fn mount() -> Self {
        let root = std::env::temp_dir().join(format!("kt-other-checkout-{}", std::process::id()));
        let dir = root.join("target/testbed/state/kt-node-2.bpf");
        std::fs::create_dir_all(&dir).expect("creating the other checkout's folder");
        let guard = OtherCheckoutBpffs(dir, root);
        let st = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&guard.0)
            .status()
            .expect("running mount");
        assert!(st.success(), "mount -t bpf failed");
        assert!(kt_testbed::cluster::mounted(&guard.0));
        guard
    }
}

impl Drop for OtherCheckoutBpffs {
    fn drop(&mut self) {
        if kt_testbed::cluster::mounted(&self.0) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

/// `kubectl exec POD -c CONTAINER -- CMD` in the laptop, as it went.
fn in_container(pod: &str, container: &str, cmd: &[&str]) -> std::process::Output {
    let mut args = vec!["kubectl", "exec", pod, "-c", container, "--"];
    args.extend_from_slice(cmd);
    run_in(Machine::Laptop, &args)
}

fn in_pod(pod: &str, cmd: &[&str]) -> String {
    let mut args = vec!["exec", pod, "--"];
    args.extend_from_slice(cmd);
    kubectl(&args)
}

/// A curl client pinned to a node.
fn client_on(name: &str, node: &str) {
    pod_on(name, node, "curlimages/curl", &["sleep", "infinity"]);
}

/// A pod pinned to a node, Ready; `command` empty runs the image's own.
fn pod_on(name: &str, node: &str, image: &str, command: &[&str]) {
    let _ = run_in(
        Machine::Laptop,
        &[
            "kubectl",
            "delete",
            "pod",
            name,
            "--ignore-not-found",
            "--grace-period=0",
            "--force",
        ],
    );
    let image = format!("--image={image}");
    let overrides = format!("--overrides={{\"spec\":{{\"nodeName\":\"{node}\"}}}}");
    let mut args = vec!["run", name, &image, &overrides];
    if !command.is_empty() {
        args.extend(["--command", "--"]);
        args.extend_from_slice(command);
    }
    kubectl(&args);
    kubectl(&[
        "wait",
        "--for=condition=Ready",
        &format!("pod/{name}"),
        "--timeout=60s",
    ]);
}

/// A testbed whose daemons all died (a crash, a machine restored from a snapshot) leaves its
/// namespaces behind; `up` replaces it whole, so an old node also gets routes to new nodes'
/// pod networks. (Sorted first: the walkthrough below ends with `down`.)
#[test]
#[ignore = "needs root and the testbed: cargo xtask e2e runs it"]
fn a_dead_one_node_testbed_is_replaced_whole_by_a_two_node_up() {
    let tb = Testbed::default();
    tb.up(UpOptions { nodes: 1 }).expect("testbed up, one node");
    let daemons = kt_testbed::daemon::Daemon::recorded(&tb.layout);
    assert!(!daemons.is_empty());
    for d in daemons.iter().filter(|d| d.alive()) {
        // SAFETY: kill(2) on a daemon this testbed started (alive() checked its start time).
        assert_eq!(unsafe { libc::kill(d.pid, libc::SIGKILL) }, 0);
    }
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while daemons.iter().any(|d| d.alive()) {
        assert!(std::time::Instant::now() < until, "daemons survive SIGKILL");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(tb.nodes(), 0);
    assert!(!kt_testbed::cluster::leftovers().is_empty());

    let tb = testbed();
    let routes = run_in(Machine::Node(1), &["ip", "route"]);
    let node2 = Machine::Node(2).pod_cidr().expect("a node has a pod CIDR");
    assert!(
        text(&routes).contains(&format!("{node2} via {}", Machine::Node(2).ip())),
        "kt-node-1 has no route to kt-node-2's pods:\n{}",
        text(&routes)
    );
    // ...and traffic crosses: a pod on node 1 reaches a pod on node 2.
    client_on("client-1", "kt-node-1");
    pod_on("web-2", "kt-node-2", "nginx", &[]);
    let ip2 = kubectl(&["get", "pod", "web-2", "-o", "jsonpath={.status.podIP}"]);
    let page = in_pod(
        "client-1",
        &[
            "curl",
            "-sS",
            "-m",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{ip2}"),
        ],
    );
    assert_eq!(page, "200", "client-1 on kt-node-1 -> web-2 on kt-node-2");
    for c in ["client-1", "web-2"] {
        kubectl(&["delete", "pod", c, "--grace-period=0", "--force"]);
    }
    assert_eq!(tb.nodes(), 2);
}

/// A folder removed when dropped.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The benchmark runs kt-connect against its shadow image as the testbed maps it: root logs in
/// over SSH with the key from the ConfigMap (as kt-connect's ktctl deploys it), a SOCKS proxy
/// over that SSH connection reaches the cluster (kt-connect's tun2socks path), and the shadow's
/// DNS on port 53 (TCP, kt-connect's localDNS mode) answers cluster names.
/// `kill -INT` of `testbed exec`'s own pid (from a script or a supervisor, with no terminal to
/// signal the whole group) reaches the command it runs in the machine, which ends as it
/// chooses, and `testbed exec` exits with its code. Before, only `testbed exec` ended and the
/// command ran on in the machine.
#[test]
#[ignore = "needs root and the testbed: cargo xtask e2e runs it"]
fn kill_int_of_testbed_exec_reaches_its_command() {
    use std::io::BufRead;
    let tb = testbed();
    let xtask = tb.layout.target.join("debug/xtask");
    assert!(xtask.exists(), "{} is missing", xtask.display());
    let mut exec = std::process::Command::new(&xtask)
        .args(["testbed", "exec", "laptop", "--", "sh", "-c"])
        .arg("trap 'echo got INT; exit 7' INT; echo ready $$; while :; do sleep 0.1; done")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starting xtask testbed exec");
    let mut out = std::io::BufReader::new(exec.stdout.take().expect("piped"));
    let mut line = String::new();
    out.read_line(&mut line).expect("reading its output");
    let pid: libc::pid_t = line
        .trim()
        .strip_prefix("ready ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("not ready: {line:?}"));
    // Should the signal not reach it, the command is ended by its pid (the testbed's machines
    // share this machine's pid namespace), so that a failure leaves nothing running.
    struct EndCommand(libc::pid_t);
    impl Drop for EndCommand {
        fn drop(&mut self) {
            // SAFETY: kill(2) of the shell this test started, if it still runs.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
    let command = EndCommand(pid);
    // SAFETY: kill(2) of the process this test started.
    assert_eq!(
        unsafe { libc::kill(exec.id() as libc::pid_t, libc::SIGINT) },
        0
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = exec.try_wait().expect("waiting") {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = exec.kill();
            panic!("testbed exec did not end within 20 s of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Checked before reading on: a command still running would hold the pipe open.
    assert_eq!(
        status.code(),
        Some(7),
        "testbed exec ends with its command's exit code, not by the signal ({status})"
    );
    // The command has ended and been reaped: its pid is nobody's to signal any more.
    std::mem::forget(command);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).expect("reading its output");
    assert_eq!(rest.trim(), "got INT", "the command got the signal");
}

#[test]
#[ignore = "needs root and the testbed: cargo xtask e2e runs it"]
fn kt_connects_shadow_image_serves_ssh_socks_and_dns_as_kt_connect_uses_them() {
    let _tb = testbed();
    seed_nginx();
    let dir = TempDir(std::env::temp_dir().join(format!("kt-e2e-ssh-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let key = dir.0.join("id_rsa");
    let key_s = key.to_str().expect("utf-8 path");
    let keygen = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", key_s])
        .status()
        .expect("ssh-keygen");
    assert!(keygen.success());
    let public = std::fs::read_to_string(dir.0.join("id_rsa.pub")).expect("public key");
    for kind in ["pod", "configmap"] {
        let _ = run_in(
            Machine::Laptop,
            &[
                "kubectl",
                "delete",
                kind,
                "ktc-shadow",
                "--ignore-not-found",
            ],
        );
    }
    kubectl(&[
        "create",
        "configmap",
        "ktc-shadow",
        &format!("--from-literal=authorized={}", public.trim()),
    ]);
    let pod = laptop_sh(
        r#"kubectl apply -f - <<'EOF'
apiVersion: v1
kind: Pod
metadata: {name: ktc-shadow, labels: {kt-role: shadow-connect}}
spec:
  containers:
  - name: standalone
    image: registry.cn-hangzhou.aliyuncs.com/rdc-incubator/kt-connect-shadow:v0.3.7
    env: [{name: KT_DNS_PROTOCOL, value: tcp}]
    volumeMounts: [{name: ssh-public-key, mountPath: /root/authorized}]
  volumes:
  - name: ssh-public-key
    configMap: {name: ktc-shadow, items: [{key: authorized, path: authorized_keys}]}
EOF"#,
    );
    assert!(
        pod.status.success(),
        "{}",
        String::from_utf8_lossy(&pod.stderr)
    );
    kubectl(&[
        "wait",
        "--for=condition=Ready",
        "pod/ktc-shadow",
        "--timeout=60s",
    ]);
    let nginx_ip = nginx_pod_ip();
    let svc_ip = kubectl(&["get", "svc", "nginx", "-o", "jsonpath={.spec.clusterIP}"]);
    // One shell in the laptop: port-forwards to 22 and 53, an SSH SOCKS proxy through the
    // first, curl through the proxy, a DNS query over TCP through the second.
    let ssh = format!(
        "ssh -i {key_s} -p 12222 -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o ConnectTimeout=5"
    );
    let dns_query = r#"
import socket, struct, sys
name, want = sys.argv[1], sys.argv[2]
q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
s = socket.create_connection(("127.0.0.1", 15353), timeout=5)
s.sendall(struct.pack(">H", len(q)) + q)
n = struct.unpack(">H", s.recv(2, socket.MSG_WAITALL))[0]
r = s.recv(n, socket.MSG_WAITALL)
rcode, answers = r[3] & 15, struct.unpack(">H", r[6:8])[0]
print(rcode, answers, socket.inet_ntoa(r[-4:]))
"#;
    let line = format!(
        r#"set -u
kubectl port-forward pod/ktc-shadow 12222:22 15353:53 >/dev/null 2>&1 & pf=$!
trap 'kill $pf ${{socks:-}} 2>/dev/null' EXIT
for i in $(seq 50); do {ssh} root@127.0.0.1 true 2>/dev/null && break; sleep 0.2; done
echo "login=$({ssh} root@127.0.0.1 'id -un')"
{ssh} -N -D 127.0.0.1:11080 root@127.0.0.1 & socks=$!
for i in $(seq 50); do curl -s -m 2 --socks5-hostname 127.0.0.1:11080 http://{nginx_ip}/ >/dev/null && break; sleep 0.2; done
echo "page=$(curl -sS -m 5 --socks5-hostname 127.0.0.1:11080 http://{nginx_ip}/)"
echo "dns=$(python3 -c '{dns_query}' nginx.default.svc.cluster.local {svc_ip})"
"#
    );
    let out = laptop_sh(&line);
    let got = text(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(got.contains("login=root"), "ssh login: {got}\n{stderr}");
    assert!(
        got.contains(&format!("page={PAGE}")),
        "SOCKS over SSH to the nginx pod: {got}\n{stderr}"
    );
    assert!(
        got.contains(&format!("dns=0 1 {svc_ip}")),
        "the shadow's DNS over TCP: {got}\n{stderr}"
    );
    for kind in ["pod", "configmap"] {
        kubectl(&["delete", kind, "ktc-shadow", "--wait=false"]);
    }
}

#[test]
#[ignore = "needs root and the testbed: cargo xtask e2e runs it"]
fn seed_walkthrough_cluster_half_across_two_nodes_then_a_clean_down() {
    let tb = testbed();
    seed_nginx();
    let nginx_pod = kubectl(&[
        "get",
        "pod",
        "-l",
        "app=nginx",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ]);
    let nginx_node = kubectl(&["get", "pod", &nginx_pod, "-o", "jsonpath={.spec.nodeName}"]);
    let cluster_ip = kubectl(&["get", "svc", "nginx", "-o", "jsonpath={.spec.clusterIP}"]);
    let pod_ip = kubectl(&["get", "pod", &nginx_pod, "-o", "jsonpath={.status.podIP}"]);
    // A client on each node: one of them crosses nodes for every request.
    client_on("client-1", "kt-node-1");
    client_on("client-2", "kt-node-2");
    for client in ["client-1", "client-2"] {
        for url in [
            "http://nginx:80",
            "http://nginx.default.svc.cluster.local",
            &format!("http://{cluster_ip}"),
            &format!("http://{pod_ip}"),
        ] {
            let got = in_pod(client, &["curl", "-sS", "-m", "5", url]);
            assert_eq!(got, PAGE, "{client} ({url}); nginx runs on {nginx_node}");
        }
    }
    // The two clients are on different nodes, so one of them reached nginx's pod IP and its
    // Service across nodes above.
    assert_ne!(
        kubectl(&["get", "pod", "client-1", "-o", "jsonpath={.spec.nodeName}"]),
        kubectl(&["get", "pod", "client-2", "-o", "jsonpath={.spec.nodeName}"])
    );

    // kubectl port-forward from the laptop.
    let pf = laptop_sh(
        "kubectl port-forward svc/nginx 18080:80 >/tmp/kt-e2e-pf.log 2>&1 & pf=$!; \
                        for i in $(seq 50); do curl -s -m 2 http://localhost:18080 && break; sleep 0.2; done; kill $pf",
    );
    assert_eq!(
        text(&pf),
        PAGE,
        "port-forward: {}",
        String::from_utf8_lossy(&pf.stderr)
    );

    // The access log reaches kubectl logs.
    let logs = kubectl(&["logs", "deploy/nginx"]);
    assert!(
        logs.contains("\"GET / HTTP/1.1\" 200"),
        "no access log line in:\n{logs}"
    );

    // kubectl exec passes the exit code through.
    let o = run_in(
        Machine::Laptop,
        &["kubectl", "exec", "client-1", "--", "sh", "-c", "exit 3"],
    );
    assert_eq!(o.status.code(), Some(3));

    // A deleted pod is replaced and the new one becomes Ready.
    kubectl(&["delete", "pod", &nginx_pod, "--wait=false"]);
    eventually("a new nginx pod Ready", Duration::from_secs(90), || {
        let names = text(&run_in(
            Machine::Laptop,
            &[
                "kubectl",
                "get",
                "pods",
                "-l",
                "app=nginx",
                "-o",
                "jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type==\"Ready\")].status} {end}",
            ],
        ));
        names
            .split_whitespace()
            .any(|p| !p.starts_with(&nginx_pod) && p.ends_with("=True"))
    });

    // An image the testbed does not have fails like a failed pull, with a message.
    let _ = run_in(
        Machine::Laptop,
        &["kubectl", "delete", "pod", "noimage", "--ignore-not-found"],
    );
    kubectl(&["run", "noimage", "--image=registry.example.com/nope:1"]);
    eventually(
        "ErrImagePull on the unknown image",
        Duration::from_secs(30),
        || {
            let st = text(&run_in(
                Machine::Laptop,
                &[
                    "kubectl",
                    "get",
                    "pod",
                    "noimage",
                    "-o",
                    "jsonpath={.status.containerStatuses[0].state.waiting.reason}",
                ],
            ));
            st == "ErrImagePull"
        },
    );
    let msg = kubectl(&[
        "get",
        "pod",
        "noimage",
        "-o",
        "jsonpath={.status.containerStatuses[0].state.waiting.message}",
    ]);
    assert!(msg.contains("image table"), "{msg}");

    // hostNetwork pods (DaemonSets) run in the node's own namespace, with its IP.
    let _ = run_in(
        Machine::Laptop,
        &["kubectl", "delete", "pod", "hostnet", "--ignore-not-found"],
    );
    kubectl(&[
        "run",
        "hostnet",
        "--image=busybox",
        "--overrides={\"spec\":{\"hostNetwork\":true,\"nodeName\":\"kt-node-1\"}}",
        "--command",
        "--",
        "sleep",
        "infinity",
    ]);
    kubectl(&[
        "wait",
        "--for=condition=Ready",
        "pod/hostnet",
        "--timeout=60s",
    ]);
    assert_eq!(
        kubectl(&["get", "pod", "hostnet", "-o", "jsonpath={.status.podIP}"]),
        "192.168.50.11"
    );
    assert!(
        in_pod("hostnet", &["ip", "-4", "-o", "addr", "show", "eth0"]).contains("192.168.50.11")
    );

    // Capabilities as the pod gives them, and an emptyDir the pod's containers share.
    let caps = laptop_sh(
        r#"kubectl apply -f - <<'EOF'
apiVersion: v1
kind: Pod
metadata: {name: caps}
spec:
  volumes: [{name: shared, emptyDir: {}}]
  containers:
  - {name: plain, image: busybox, command: [sleep, infinity], volumeMounts: [{name: shared, mountPath: /shared}]}
  - name: netadmin
    image: busybox
    command: [sleep, infinity]
    securityContext: {capabilities: {add: [NET_ADMIN]}}
    volumeMounts: [{name: shared, mountPath: /shared}]
EOF"#,
    );
    assert!(
        caps.status.success(),
        "{}",
        String::from_utf8_lossy(&caps.stderr)
    );
    kubectl(&["wait", "--for=condition=Ready", "pod/caps", "--timeout=60s"]);
    let plain = in_container(
        "caps",
        "plain",
        &[
            "ip", "link", "add", "kt-a0", "type", "veth", "peer", "name", "kt-b0",
        ],
    );
    assert!(
        !plain.status.success(),
        "a container without NET_ADMIN added a link"
    );
    let ok = |container: &str, cmd: &[&str]| {
        let mut args = vec!["exec", "caps", "-c", container, "--"];
        args.extend_from_slice(cmd);
        kubectl(&args)
    };
    ok(
        "netadmin",
        &[
            "ip", "link", "add", "kt-a1", "type", "veth", "peer", "name", "kt-b1",
        ],
    );
    ok(
        "plain",
        &["sh", "-c", "echo shared-by-containers > /shared/f"],
    );
    assert_eq!(
        ok("netadmin", &["cat", "/shared/f"]),
        "shared-by-containers"
    );
    // Each container has a root of its own: a file written elsewhere stays private.
    ok("plain", &["sh", "-c", "echo mine > /root/private"]);
    assert!(
        !in_container("caps", "netadmin", &["cat", "/root/private"])
            .status
            .success()
    );

    // No back door: the laptop has no route to cluster addresses.
    assert!(
        !laptop_reaches(&format!("http://{cluster_ip}")),
        "the laptop reached the ClusterIP without ktctl"
    );
    assert!(
        !laptop_reaches(&format!("http://{pod_ip}")),
        "the laptop reached a pod IP without ktctl"
    );
    // ...but its own resolver answers.
    assert!(laptop_ok(&["getent", "hosts", "home.test"]).starts_with("192.168.50.200"));

    for c in ["client-1", "client-2", "noimage", "hostnet", "caps"] {
        let _ = run_in(
            Machine::Laptop,
            &["kubectl", "delete", "pod", c, "--grace-period=0", "--force"],
        );
    }

    // down: no process, namespace, veth, mount or cgroup left; safe to repeat. That includes
    // a node bpf filesystem that a run cut short in another checkout left (testbed names are
    // machine-wide, so it counts as this testbed's leftover).
    let other = OtherCheckoutBpffs::mount();
    let daemons = kt_testbed::daemon::Daemon::recorded(&tb.layout);
    assert!(!daemons.is_empty());
    tb.down().expect("testbed down");
    assert!(
        !kt_testbed::cluster::mounted(&other.0),
        "down left another checkout's node bpf filesystem"
    );
    for d in &daemons {
        assert!(!d.alive(), "{} (pid {}) survived down", d.name, d.pid);
    }
    let left = kt_testbed::cluster::leftovers();
    assert!(left.is_empty(), "left behind: {left:?}");
    Testbed::default().down().expect("a second down");
}
