//! The router DaemonSet (deploy/router.yaml) and `exchange --mode ebpf` end to end: steering
//! inside the nodes, for a caller on the other node by ClusterIP, by name and by pod IP, with
//! the Service and its Deployment untouched; installed and removed with kubectl alone.

mod common;

use std::time::Duration;

use common::*;
use kt_testbed::Machine;

const BANNER: &str = "Now all request to service 'nginx' will be redirected to local";
/// A client pod on the node the nginx pod is not on.
const FAR: &str = "e2e-far-client";

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

/// The far client pod, on the node the nginx pod is not on.
fn far_client() {
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
    let exists = run_in(Machine::Laptop, &["kubectl", "get", "pod", FAR])
        .status
        .success();
    if !exists {
        let overrides = format!(r#"{{"spec":{{"nodeName":"{other}"}}}}"#);
        kubectl(&[
            "run",
            FAR,
            "--image=busybox:1",
            "--restart=Never",
            &format!("--overrides={overrides}"),
            "--",
            "sleep",
            "infinity",
        ]);
    }
    kubectl(&[
        "wait",
        &format!("pod/{FAR}"),
        "--for=condition=Ready",
        "--timeout=60s",
    ]);
}

/// What the far client gets from `url` (empty on failure).
fn from_far(url: &str) -> String {
    text(&run_in(
        Machine::Laptop,
        &["kubectl", "exec", FAR, "--", "curl", "-sS", "-m", "3", url],
    ))
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

fn all_get(what: &str, want: &str, timeout: Duration) {
    for url in urls() {
        eventually(&format!("{url} to give {what}"), timeout, || {
            from_far(&url) == want
        });
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

/// Programs named kt_tc_* loaded anywhere on this machine (every node is a namespace of it).
fn tc_programs_loaded() -> usize {
    let out = std::process::Command::new("bpftool")
        .args(["prog", "show"])
        .output()
        .expect("bpftool");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("kt_tc_ingress") || l.contains("kt_tc_egress"))
        .count()
}

#[test]
#[ignore = "needs root and the testbed: cargo xtask e2e runs it"]
/// Without the router, `--mode ebpf` is a usage error naming the manifest; with it, a caller
/// on the other node gets the local page by ClusterIP, name and pod IP while the Service and
/// the Deployment keep their resourceVersion; a router pod replaced keeps steering; Ctrl-C and
/// `kill -9` (after `--grace`) end it; `kubectl delete -f` leaves no program loaded.
fn exchange_in_ebpf_mode_steers_inside_the_nodes_and_changes_nothing() {
    let _tb = testbed();
    seed_nginx();
    far_client();
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

    kubectl(&["apply", "-f", &manifests()]);
    kubectl(&[
        "-n",
        "kt-system",
        "rollout",
        "status",
        "ds/kt-router",
        "--timeout=120s",
    ]);
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

    // A router pod replaced (a rollout, an eviction): the new one steers again by itself.
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
    assert!(tc_programs_loaded() > 0, "the routers' programs are loaded");
    kubectl(&["delete", "-f", &manifests(), "--wait=true"]);
    eventually(
        "the routers' programs to go",
        Duration::from_secs(60),
        || tc_programs_loaded() == 0,
    );
}
