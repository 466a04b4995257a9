//! `exchange`, `preview` and `forward` end to end: cluster traffic to the laptop and back, from
//! the seed walkthrough, with a local nginx on the laptop and a client pod in the cluster.

mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use kt_testbed::{Machine, Testbed, machine};

const BANNER: &str = "Now all request to service 'nginx' will be redirected to local";

#[test]
#[ignore = "needs root and the testbed: cargo xtask e2e runs it"]
/// The seed walkthrough: `ktctl exchange nginx --expose 80`; from the connected laptop and
/// from a cluster pod, nginx answers with the local page; a reverted selector is put back; a
/// tunnel cut heals within seconds; Ctrl-C restores the Service exactly.
fn exchange_redirects_a_service_to_local_and_restores_it_exactly() {
    let _tb = testbed();
    seed_nginx();
    client_pod();
    let _local = LocalServer::start(80, LOCAL);
    let before = svc_spec("nginx");
    assert_eq!(from_cluster("http://nginx:80"), PAGE);

    let _connect = Ktctl::connect(&[]);
    let mut k = Ktctl::spawn(&["exchange", "nginx", "--expose", "80"]);
    k.wait_for(BANNER, Duration::from_secs(120));
    let out = k.output();
    let banner_at = out
        .lines()
        .position(|l| l.contains(BANNER))
        .expect("banner");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[banner_at - 1].ends_with(&"-".repeat(63))
            && lines[banner_at + 1].ends_with(&"-".repeat(63)),
        "the banner sits between kt-connect's dashed lines:\n{out}"
    );
    let id = session_id(&k);
    eventually(
        "the cluster pod to get the local page",
        Duration::from_secs(30),
        || from_cluster("http://nginx:80") == LOCAL,
    );
    eventually(
        "the laptop to get the local page",
        Duration::from_secs(30),
        || from_laptop("http://nginx:80") == LOCAL,
    );
    let annotations = svc_annotations("nginx");
    assert!(
        annotations.contains("kt.dev/original-selector") && annotations.contains(&id),
        "what changed and who changed it are written on the Service: {annotations}"
    );

    // Someone reverts the selector: ktctl takes it back and says so.
    kubectl(&[
        "patch",
        "svc",
        "nginx",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/selector","value":{"app":"nginx"}}]"#,
    ]);
    k.wait_for("putting the shadow's back", Duration::from_secs(20));
    eventually(
        "the selector to be the shadow's again",
        Duration::from_secs(20),
        || svc_spec("nginx").contains(&id),
    );
    eventually("the local page again", Duration::from_secs(30), || {
        from_cluster("http://nginx:80") == LOCAL
    });

    // Cut the tunnel (the port-forward's leg into the shadow): requests work again within 5 s
    // of the reconnect, without restarting ktctl.
    let shadow = shadow_of(&id);
    assert_eq!(
        shadow,
        format!("nginx-kt-exchange-{id}"),
        "kt-connect's name"
    );
    let node = kubectl(&["get", "pod", &shadow, "-o", "jsonpath={.spec.nodeName}"]);
    let node = Machine::parse(&node).expect("node");
    let lines_before = k.output().lines().count();
    let killed = run_in(node, &["ss", "-K", "dport", "=", ":7443"]);
    assert!(
        killed.status.success(),
        "ss -K: {}",
        String::from_utf8_lossy(&killed.stderr)
    );
    k.wait_for("tunnel lost", Duration::from_secs(30));
    k.wait_for("tunnel re-established", Duration::from_secs(30));
    let back = Instant::now();
    eventually(
        "the local page after the cut",
        Duration::from_secs(5),
        || from_cluster("http://nginx:80") == LOCAL,
    );
    assert!(back.elapsed() < Duration::from_secs(5));
    assert!(k.output().lines().count() > lines_before);

    // Ctrl-C: the Service is exactly what it was, and the cluster page is back.
    assert_eq!(k.stop(libc::SIGINT, Duration::from_secs(30)), Some(0));
    assert!(
        k.output()
            .contains("Restored the selector of service 'nginx'"),
        "{}",
        k.output()
    );
    assert_eq!(
        svc_spec("nginx"),
        before,
        "the Service's spec is exactly what it was"
    );
    assert!(
        !svc_annotations("nginx").contains("kt.dev/"),
        "no record left on the Service"
    );
    eventually("the cluster page again", Duration::from_secs(30), || {
        from_cluster("http://nginx:80") == PAGE
    });
    eventually(
        "the cluster page on the laptop",
        Duration::from_secs(30),
        || from_laptop("http://nginx:80") == PAGE,
    );
    eventually(
        "the session's objects to go",
        Duration::from_secs(30),
        || session_objects(&format!("kt.dev/session={id}")).is_empty(),
    );
}

#[test]
#[ignore = "needs root and the testbed: cargo xtask e2e runs it"]
/// `kill -9` of ktctl during an exchange: its shadow restores the Service and ends the session
/// within --grace + 15 s, with nobody running any command. A second exchange of the Service
/// meanwhile fails at once naming the holder, and creates nothing.
fn a_killed_exchange_is_restored_by_its_shadow_and_a_second_exchange_names_the_holder() {
    let _tb = testbed();
    seed_nginx();
    client_pod();
    let _local = LocalServer::start(80, LOCAL);
    let before = svc_spec("nginx");
    let mut k = Ktctl::spawn(&["exchange", "nginx", "--expose", "80", "--grace", "5"]);
    k.wait_for(BANNER, Duration::from_secs(120));
    let id = session_id(&k);

    let mut second = Ktctl::spawn(&["exchange", "nginx", "--expose", "80"]);
    assert_eq!(
        second.wait(Duration::from_secs(60)),
        Some(1),
        "{}",
        second.output()
    );
    let out = second.output();
    assert!(
        out.contains("service 'nginx' is already taken") && out.contains(&id) && out.contains("@"),
        "the error names the holder (session, user@machine): {out}"
    );
    let second_pid = out
        .split(" start at ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("ktctl says its pid");
    // No session of its own (its anchor Lease would name its pid as the holder). Sessions of
    // other processes are not this test's business: one once appeared here in CI, made by
    // something else, and the list below says who holds each.
    let sessions = kubectl(&[
        "get",
        "leases",
        "-l",
        "kt.dev/role=anchor",
        "-o",
        r"custom-columns=NAME:.metadata.name,HOLDER:.spec.holderIdentity,COMMAND:.metadata.annotations.kt\.dev/command,CREATED:.metadata.creationTimestamp",
    ]);
    assert!(
        !sessions
            .split_whitespace()
            .any(|w| w.starts_with("ktctl/") && w.ends_with(&format!("/{second_pid}")))
            && !out.contains("session started"),
        "the second exchange (pid {second_pid}) created no session:\n{sessions}\n{out}"
    );

    eventually("the local page", Duration::from_secs(30), || {
        from_cluster("http://nginx:80") == LOCAL
    });
    let killed = Instant::now();
    assert_eq!(k.stop(libc::SIGKILL, Duration::from_secs(10)), None);
    eventually(
        "the shadow to restore the Service",
        Duration::from_secs(5 + 15),
        || svc_spec("nginx") == before && !svc_annotations("nginx").contains("kt.dev/"),
    );
    let lease = format!("ktctl-{id}");
    eventually(
        "the shadow to end the session (its Lease deleted)",
        Duration::from_secs(5 + 15).saturating_sub(killed.elapsed()),
        || {
            !run_in(Machine::Laptop, &["kubectl", "get", "lease", &lease])
                .status
                .success()
        },
    );
    eventually(
        "the session's objects to go",
        Duration::from_secs(30),
        || session_objects(&format!("kt.dev/session={id}")).is_empty(),
    );
    eventually("the cluster page again", Duration::from_secs(30), || {
        from_cluster("http://nginx:80") == PAGE
    });
}

#[test]
#[ignore = "needs root and the testbed: cargo xtask e2e runs it"]
/// `ktctl mesh nginx --expose 80`: requests with the developer's header come to the laptop,
/// the rest stay with the cluster's pods; two developers each get their own; one leaving does
/// not disturb the other; the last one leaving restores the Service exactly.
fn mesh_routes_by_header_for_two_developers_and_the_last_restores_the_service() {
    let _tb = testbed();
    seed_nginx();
    client_pod();
    let _a_page = LocalServer::start(80, LOCAL);
    let _b_page = LocalServer::start(8081, "developer b");
    let before = svc_spec("nginx");

    let mut a = Ktctl::spawn(&[
        "mesh",
        "nginx",
        "--expose",
        "80",
        "--versionMark",
        "VERSION:alice",
    ]);
    a.wait_for(
        "Now you can access your service by header 'VERSION: alice'",
        Duration::from_secs(120),
    );
    let mut b = Ktctl::spawn(&[
        "mesh",
        "nginx",
        "--expose",
        "8081:80",
        "--versionMark",
        "bob",
    ]);
    b.wait_for(
        "Now you can access your service by header 'VERSION: bob'",
        Duration::from_secs(120),
    );

    eventually(
        "requests to go through the router",
        Duration::from_secs(30),
        || from_cluster_with("http://nginx:80", "VERSION: alice") == LOCAL,
    );
    assert_eq!(
        from_cluster("http://nginx:80"),
        PAGE,
        "no header: the cluster's pods"
    );
    assert_eq!(
        from_cluster_with("http://nginx:80", "version: alice"),
        LOCAL,
        "header names are case-insensitive"
    );
    assert_eq!(
        from_cluster_with("http://nginx:80", "VERSION: bob"),
        "developer b"
    );
    assert_eq!(from_cluster_with("http://nginx:80", "VERSION: carol"), PAGE);

    // Alice leaves: Bob's route and the rest go on.
    assert_eq!(a.stop(libc::SIGINT, Duration::from_secs(30)), Some(0));
    assert!(
        a.output().contains("still mesh service 'nginx'"),
        "{}",
        a.output()
    );
    assert!(
        run_in(
            Machine::Laptop,
            &["kubectl", "get", "lease", "nginx-kt-lock"]
        )
        .status
        .success(),
        "the shared lock stays while bob meshes"
    );
    assert_eq!(
        from_cluster_with("http://nginx:80", "VERSION: bob"),
        "developer b"
    );
    assert_eq!(from_cluster("http://nginx:80"), PAGE);
    eventually("alice's route to go", Duration::from_secs(30), || {
        from_cluster_with("http://nginx:80", "VERSION: alice") == PAGE
    });

    // Bob leaves last: the Service is exactly what it was, and the router goes.
    assert_eq!(b.stop(libc::SIGINT, Duration::from_secs(30)), Some(0));
    assert!(
        b.output()
            .contains("Restored the selector of service 'nginx'"),
        "{}",
        b.output()
    );
    assert_eq!(svc_spec("nginx"), before);
    assert!(!svc_annotations("nginx").contains("kt.dev/"));
    eventually(
        "the router and stuntman to go",
        Duration::from_secs(30),
        || {
            kubectl(&[
                "get",
                "pods,services,leases",
                "-l",
                "kt.dev/mesh-of=nginx",
                "-o",
                "name",
            ])
            .is_empty()
                && !run_in(
                    Machine::Laptop,
                    &["kubectl", "get", "lease", "nginx-kt-lock"],
                )
                .status
                .success()
        },
    );
    assert_eq!(from_cluster("http://nginx:80"), PAGE);
}

#[test]
#[ignore = "needs root and the testbed: cargo xtask e2e runs it"]
/// `ktctl preview nginx-v2 --expose 80` makes the local page a Service; developer B's
/// `ktctl forward nginx-v2 6060:80` reaches it on localhost, and recovers on its own when the
/// pod it uses is deleted. `forward` also takes a Deployment and a pod IP.
fn preview_makes_a_service_and_forward_reaches_it_across_a_deleted_pod() {
    let _tb = testbed();
    seed_nginx();
    client_pod();
    let _local = LocalServer::start(80, LOCAL);
    let mut a = Ktctl::spawn(&["preview", "nginx-v2", "--expose", "80"]);
    a.wait_for(
        "Now you can access your local service in cluster by name 'nginx-v2'",
        Duration::from_secs(120),
    );
    let id = session_id(&a);
    eventually(
        "the preview from a cluster pod",
        Duration::from_secs(30),
        || from_cluster("http://nginx-v2:80") == LOCAL,
    );

    let mut b = Ktctl::spawn(&["forward", "nginx-v2", "6060:80"]);
    b.wait_for(
        "Now you can access port 80 of service 'nginx-v2' via 'localhost:6060'",
        Duration::from_secs(60),
    );
    assert_eq!(from_laptop("http://localhost:6060"), LOCAL);

    // The pod forward uses goes away; A's ktctl starts a new shadow and B's forward finds it.
    let shadow = shadow_of(&id);
    assert_eq!(shadow, format!("nginx-v2-kt-{id}"), "kt-connect's name");
    kubectl(&["delete", "pod", &shadow, "--wait=false"]);
    eventually(
        "forward to recover on its own",
        Duration::from_secs(60),
        || from_laptop("http://localhost:6060") == LOCAL,
    );
    b.wait_for(
        &format!("Forwarding to pod {shadow}-1"),
        Duration::from_secs(5),
    );

    // A Deployment (its first port by default) and a pod IP (through a tunnel).
    let mut d = Ktctl::spawn(&["forward", "deployment/nginx", "6061"]);
    d.wait_for(
        "Now you can access port 80 of deployment 'nginx' via 'localhost:6061'",
        Duration::from_secs(60),
    );
    assert_eq!(from_laptop("http://localhost:6061"), PAGE);
    let ip = nginx_pod_ip();
    let mut i = Ktctl::spawn(&["forward", &ip, "6062:80"]);
    i.wait_for(
        &format!("Now you can access to '{ip}:80' via 'localhost:6062'"),
        Duration::from_secs(120),
    );
    assert_eq!(from_laptop("http://localhost:6062"), PAGE);
    for k in [&mut d, &mut i, &mut b] {
        assert_eq!(
            k.stop(libc::SIGINT, Duration::from_secs(30)),
            Some(0),
            "{}",
            k.output()
        );
    }

    assert_eq!(a.stop(libc::SIGINT, Duration::from_secs(30)), Some(0));
    assert!(
        a.output().contains("Deleted service/nginx-v2"),
        "{}",
        a.output()
    );
    assert!(
        !run_in(Machine::Laptop, &["kubectl", "get", "svc", "nginx-v2"])
            .status
            .success()
    );
}

#[test]
#[ignore = "needs root and the testbed: cargo xtask e2e runs it"]
/// scale mode: the Deployment goes to 0 while a shadow with its labels answers; on exit its
/// replicas come back and ktctl waits for them. Regression: a headless companion Service
/// selecting the same pods made `deployment/nginx` ambiguous.
fn exchange_in_scale_mode_restores_the_replicas_and_waits_for_them() {
    let _tb = testbed();
    seed_nginx();
    let headless = laptop_sh(
        "kubectl create service clusterip nginx-headless --clusterip=None --tcp=80:80 -o yaml --dry-run=client \
         | sed 's/app: nginx-headless/app: nginx/' | kubectl apply -f -",
    );
    assert!(
        headless.status.success(),
        "{}",
        String::from_utf8_lossy(&headless.stderr)
    );
    client_pod();
    let _local = LocalServer::start(80, LOCAL);
    let mut k = Ktctl::spawn(&[
        "exchange",
        "deployment/nginx",
        "--expose",
        "80",
        "--mode",
        "scale",
    ]);
    k.wait_for(
        "Now all request to deployment 'nginx' will be redirected to local",
        Duration::from_secs(120),
    );
    assert_eq!(
        kubectl(&["get", "deploy", "nginx", "-o", "jsonpath={.spec.replicas}"]),
        "0"
    );
    eventually("the local page", Duration::from_secs(60), || {
        from_cluster("http://nginx:80") == LOCAL
    });
    assert_eq!(k.stop(libc::SIGINT, Duration::from_secs(120)), Some(0));
    let out = k.output();
    assert!(
        out.contains("Restored deployment 'nginx' to 1 replicas"),
        "{out}"
    );
    assert!(
        out.contains("Deployment 'nginx' has 1/1 ready replicas"),
        "ktctl waited: {out}"
    );
    assert_eq!(
        kubectl(&["get", "deploy", "nginx", "-o", "jsonpath={.spec.replicas}"]),
        "1"
    );
    assert!(
        !kubectl(&[
            "get",
            "deploy",
            "nginx",
            "-o",
            "jsonpath={.metadata.annotations}"
        ])
        .contains("kt.dev/")
    );
    // The new pod serves the image's page; the walkthrough's page is put back for the others.
    seed_nginx();
    eventually("the cluster page", Duration::from_secs(30), || {
        from_cluster("http://nginx:80") == PAGE
    });
}

#[test]
#[ignore = "needs root and the testbed: cargo xtask e2e runs it"]
/// Bad input is a clear error naming the flag or object, exit 2, and nothing is created.
fn bad_input_to_the_inbound_commands_fails_clearly_and_creates_nothing() {
    let _tb = testbed();
    seed_nginx();
    let _local = LocalServer::start(80, LOCAL);
    let fixtures = laptop_sh(
        r#"kubectl apply -f - <<'EOF'
apiVersion: v1
kind: Service
metadata: {name: e2e-noselector}
spec: {ports: [{port: 80}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: e2e-zero}
spec:
  replicas: 0
  selector: {matchLabels: {app: e2e-zero}}
  template:
    metadata: {labels: {app: e2e-zero}}
    spec: {containers: [{name: nginx, image: "nginx:alpine"}]}
---
apiVersion: v1
kind: Service
metadata: {name: e2e-zero}
spec: {selector: {app: e2e-zero}, ports: [{port: 80}]}
EOF"#,
    );
    assert!(
        fixtures.status.success(),
        "{}",
        String::from_utf8_lossy(&fixtures.stderr)
    );
    let objects = || {
        kubectl(&[
            "get",
            "leases,pods,services",
            "-l",
            "app.kubernetes.io/managed-by=ktctl",
            "-o",
            "name",
        ])
    };
    let before = objects();
    let nginx_before = svc_spec("nginx");
    for (args, needle) in [
        (
            vec!["exchange", "nosuch", "--expose", "80"],
            "service 'nosuch' not found",
        ),
        (
            vec!["exchange", "deploy/nosuch", "--expose", "80"],
            "deployment 'nosuch' not found",
        ),
        (vec!["exchange", "nginx", "--expose", "99999"], "--expose"),
        (
            vec!["exchange", "nginx", "--expose", "8080"],
            "--expose 8080: service 'nginx' has no port 8080",
        ),
        (
            vec!["exchange", "nginx", "--expose", "7777:80"],
            "nothing accepts connections on 127.0.0.1:7777",
        ),
        (
            vec!["exchange", "e2e-noselector", "--expose", "80"],
            "service 'e2e-noselector' has no selector",
        ),
        (
            vec!["exchange", "e2e-zero", "--expose", "80", "--mode", "scale"],
            "deployment 'e2e-zero' has 0 replicas",
        ),
        (
            vec!["exchange", "nginx", "--expose", "80", "--mode", "sideways"],
            "--mode",
        ),
        (
            vec!["exchange", "nginx", "--expose", "80", "--mode", "ephemeral"],
            "--mode ephemeral is not offered",
        ),
        (
            vec!["mesh", "nginx", "--expose", "80", "--versionMark", "a_b"],
            "--versionMark",
        ),
        (
            vec![
                "mesh",
                "nginx",
                "--expose",
                "80",
                "--versionMark",
                "bad header:v",
            ],
            "--versionMark",
        ),
        (
            vec![
                "mesh",
                "nginx",
                "--expose",
                "80",
                "--versionMark",
                "v:two words",
            ],
            "--versionMark",
        ),
        (
            vec!["preview", "nginx", "--expose", "80"],
            "service 'nginx' already exists",
        ),
        (
            vec!["preview", "Bad_Name", "--expose", "80"],
            "not a valid Service name",
        ),
        (
            vec!["forward", "nosuch", "6070:80"],
            "service 'nosuch' not found",
        ),
        (
            vec!["forward", "10.244.1.9"],
            "give the ports as local:remote",
        ),
    ] {
        let (code, out) = ktctl_exit(&args);
        assert_eq!(code, Some(2), "{args:?} exits 2:\n{out}");
        assert!(
            out.contains(needle),
            "{args:?}: the error names {needle:?}:\n{out}"
        );
    }
    assert_eq!(objects(), before, "nothing was created");
    assert_eq!(svc_spec("nginx"), nginx_before);
}

#[test]
#[ignore = "needs root and the testbed: cargo xtask e2e runs it"]
/// `kill -9` of the only developer meshing a Service: with nobody running any command, the
/// Service is restored within --grace + 15 s and the router goes.
fn a_killed_mesh_is_restored_without_anyone() {
    let _tb = testbed();
    seed_nginx();
    client_pod();
    let _local = LocalServer::start(80, LOCAL);
    let before = svc_spec("nginx");
    let mut k = Ktctl::spawn(&[
        "mesh",
        "nginx",
        "--expose",
        "80",
        "--versionMark",
        "kill9",
        "--grace",
        "5",
    ]);
    k.wait_for(
        "Now you can access your service by header 'VERSION: kill9'",
        Duration::from_secs(120),
    );
    eventually("the route", Duration::from_secs(30), || {
        from_cluster_with("http://nginx:80", "VERSION: kill9") == LOCAL
    });
    let killed = Instant::now();
    assert_eq!(k.stop(libc::SIGKILL, Duration::from_secs(10)), None);
    eventually(
        "the Service to be restored",
        Duration::from_secs(5 + 15),
        || svc_spec("nginx") == before && !svc_annotations("nginx").contains("kt.dev/"),
    );
    eprintln!("restored {:?} after kill -9", killed.elapsed());
    eventually("the router to go", Duration::from_secs(30), || {
        kubectl(&[
            "get",
            "pods,services",
            "-l",
            "kt.dev/mesh-of=nginx",
            "-o",
            "name",
        ])
        .is_empty()
    });
    assert_eq!(from_cluster("http://nginx:80"), PAGE);
}

#[test]
#[ignore = "needs root and the testbed: cargo xtask e2e runs it"]
/// The Roles in deploy/ are enough for exchange (the shadow's Role, which grants get/update on
/// the Service, passes RBAC's escalation check); without the inbound Role, exchange names it.
fn the_namespaced_roles_in_deploy_are_enough_for_exchange() {
    let tb = testbed();
    seed_nginx();
    client_pod();
    let _local = LocalServer::start(80, LOCAL);
    for f in ["deploy/rbac-connect.yaml", "deploy/rbac-inbound.yaml"] {
        kubectl(&[
            "apply",
            "-f",
            tb.layout.workspace.join(f).to_str().expect("utf-8"),
        ]);
    }
    let _ = run_in(
        Machine::Laptop,
        &[
            "kubectl",
            "delete",
            "rolebinding",
            "e2e-dev2-connect",
            "e2e-dev2-inbound",
            "--ignore-not-found",
        ],
    );
    kubectl(&[
        "create",
        "rolebinding",
        "e2e-dev2-connect",
        "--role=ktctl-connect",
        "--user=e2e-dev2",
    ]);
    let kc = kt_testbed::pki::user_kubeconfig(&tb.layout, "e2e-dev2", &[], "default")
        .expect("user kubeconfig");
    let kc = kc.to_str().expect("utf-8");
    let (code, out) = ktctl_exit(&["exchange", "nginx", "--expose", "80", "--kubeconfig", kc]);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("deploy/rbac-inbound.yaml"),
        "the error names the Role to bind: {out}"
    );

    kubectl(&[
        "create",
        "rolebinding",
        "e2e-dev2-inbound",
        "--role=ktctl-inbound",
        "--user=e2e-dev2",
    ]);
    let before = svc_spec("nginx");
    let mut k = Ktctl::spawn(&["exchange", "nginx", "--expose", "80", "--kubeconfig", kc]);
    k.wait_for(BANNER, Duration::from_secs(120));
    eventually("the local page", Duration::from_secs(30), || {
        from_cluster("http://nginx:80") == LOCAL
    });
    assert_eq!(k.stop(libc::SIGINT, Duration::from_secs(30)), Some(0));
    assert_eq!(svc_spec("nginx"), before);
    kubectl(&[
        "delete",
        "rolebinding",
        "e2e-dev2-connect",
        "e2e-dev2-inbound",
    ]);
}

#[test]
#[ignore = "needs root and the testbed: cargo xtask e2e runs it"]
/// The shadow and the mesh router keep working across an API server outage longer than the
/// grace period: nothing is restored behind the developers' backs, and the router's watch of
/// the routes comes back (a developer joining after the outage gets their route).
fn exchange_and_mesh_ride_out_an_api_server_outage() {
    let tb = testbed();
    seed_nginx();
    client_pod();
    let mesh_fixture = laptop_sh(
        r#"kubectl apply -f - <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata: {name: e2e-mesh}
spec:
  selector: {matchLabels: {app: e2e-mesh}}
  template:
    metadata: {labels: {app: e2e-mesh}}
    spec: {containers: [{name: nginx, image: "nginx:alpine", ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: e2e-mesh}
spec: {selector: {app: e2e-mesh}, ports: [{port: 80}]}
EOF"#,
    );
    assert!(
        mesh_fixture.status.success(),
        "{}",
        String::from_utf8_lossy(&mesh_fixture.stderr)
    );
    kubectl(&["rollout", "status", "deploy/e2e-mesh", "--timeout=90s"]);
    eventually("the e2e-mesh Service", Duration::from_secs(30), || {
        !from_cluster("http://e2e-mesh:80").is_empty()
    });
    let mesh_page = from_cluster("http://e2e-mesh:80");
    let _a = LocalServer::start(80, LOCAL);
    let _b = LocalServer::start(8082, "mesh developer");
    let _c = LocalServer::start(8083, "late developer");
    let grace = 5u64;
    let g = grace.to_string();
    let mut x = Ktctl::spawn(&["exchange", "nginx", "--expose", "80", "--grace", &g]);
    x.wait_for(BANNER, Duration::from_secs(120));
    let mut m = Ktctl::spawn(&[
        "mesh",
        "e2e-mesh",
        "--expose",
        "8082:80",
        "--versionMark",
        "VERSION:api",
        "--grace",
        &g,
    ]);
    m.wait_for(
        "Now you can access your service by header 'VERSION: api'",
        Duration::from_secs(120),
    );
    eventually("both to work", Duration::from_secs(30), || {
        from_cluster("http://nginx:80") == LOCAL
            && from_cluster_with("http://e2e-mesh:80", "VERSION: api") == "mesh developer"
    });
    {
        let _back = ApiServerBack;
        tb.stop_component("kube-apiserver")
            .expect("stop the API server");
        // The outage itself is what is tested: more than twice the grace period.
        std::thread::sleep(Duration::from_secs(2 * grace + 2));
    }
    eventually(
        "both to work after the outage",
        Duration::from_secs(60),
        || {
            from_cluster("http://nginx:80") == LOCAL
                && from_cluster_with("http://e2e-mesh:80", "VERSION: api") == "mesh developer"
        },
    );
    let mut late = Ktctl::spawn(&[
        "mesh",
        "e2e-mesh",
        "--expose",
        "8083:80",
        "--versionMark",
        "VERSION:late",
    ]);
    late.wait_for(
        "Now you can access your service by header 'VERSION: late'",
        Duration::from_secs(120),
    );
    let routed = Instant::now();
    while from_cluster_with("http://e2e-mesh:80", "VERSION: late") != "late developer" {
        if routed.elapsed() > Duration::from_secs(30) {
            let logs = run_in(Machine::Laptop, &["kubectl", "logs", "e2e-mesh-kt-router"]);
            panic!(
                "the late developer's route never worked; the router's log:\n{}",
                String::from_utf8_lossy(&logs.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(from_cluster("http://e2e-mesh:80"), mesh_page);
    for k in [&mut x, &mut m] {
        assert!(
            k.child
                .as_mut()
                .expect("running")
                .try_wait()
                .expect("wait")
                .is_none(),
            "ktctl ended during the outage:\n{}",
            k.output()
        );
    }
    for k in [&mut late, &mut m, &mut x] {
        assert_eq!(
            k.stop(libc::SIGINT, Duration::from_secs(30)),
            Some(0),
            "{}",
            k.output()
        );
    }
    assert!(!svc_annotations("nginx").contains("kt.dev/"));
    assert!(!svc_annotations("e2e-mesh").contains("kt.dev/"));
}

/// The testbed's http-echo (HTTP/1.1, h2c and gRPC on one port) on the laptop's loopback;
/// stopped when dropped.
struct LocalEcho(Child);

impl LocalEcho {
    fn start(port: u16, page: &str) -> LocalEcho {
        let tb = Testbed::default();
        let mut cmd =
            machine::command(&tb.layout, Machine::Laptop, tb.layout.bin().join("kt-node"))
                .expect("command");
        cmd.args(["http-echo", "--port", &port.to_string(), "--page", page])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let e = LocalEcho(cmd.spawn().expect("http-echo starts"));
        eventually("the local http-echo", Duration::from_secs(10), || {
            laptop_reaches(&format!("http://127.0.0.1:{port}/"))
        });
        e
    }
}

impl Drop for LocalEcho {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A shell line in the client pod; its stdout.
fn in_cluster_sh(line: &str) -> String {
    text(&run_in(
        Machine::Laptop,
        &["kubectl", "exec", "e2e-client", "--", "sh", "-c", line],
    ))
}

#[test]
#[ignore = "needs root and the testbed: cargo xtask e2e runs it"]
/// The mesh router routes per request: HTTP/2 with prior knowledge and gRPC (h2c, trailers),
/// each with and without the header, and one HTTP/1.1 keep-alive connection carrying both kinds.
fn mesh_routes_http2_and_grpc_per_request() {
    let _tb = testbed();
    client_pod();
    let fixture = laptop_sh(
        r#"kubectl apply -f - <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata: {name: e2e-echo}
spec:
  selector: {matchLabels: {app: e2e-echo}}
  template:
    metadata: {labels: {app: e2e-echo}}
    spec: {containers: [{name: echo, image: "kt-testbed/http-echo:1", args: ["--port", "9090", "--page", "cluster-echo"], ports: [{containerPort: 9090}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: e2e-echo}
spec: {selector: {app: e2e-echo}, ports: [{port: 9090}]}
EOF"#,
    );
    assert!(
        fixture.status.success(),
        "{}",
        String::from_utf8_lossy(&fixture.stderr)
    );
    kubectl(&["rollout", "status", "deploy/e2e-echo", "--timeout=90s"]);
    let _local = LocalEcho::start(9090, "local-echo");
    let mut k = Ktctl::spawn(&[
        "mesh",
        "e2e-echo",
        "--expose",
        "9090",
        "--versionMark",
        "VERSION:h2",
    ]);
    k.wait_for(
        "Now you can access your service by header 'VERSION: h2'",
        Duration::from_secs(120),
    );
    let url = "http://e2e-echo:9090/";
    eventually("the route", Duration::from_secs(30), || {
        from_cluster_with(url, "VERSION: h2") == "local-echo"
    });

    // HTTP/2 with prior knowledge.
    let h2 = |header: &str| {
        in_cluster_sh(&format!(
            "curl -sS -m 5 -i --http2-prior-knowledge {header} {url}"
        ))
    };
    let plain = h2("");
    assert!(
        plain.starts_with("HTTP/2 200") && plain.ends_with("cluster-echo"),
        "{plain}"
    );
    assert!(
        plain.contains("x-proto: HTTP/2.0"),
        "HTTP/2 end to end: {plain}"
    );
    let marked = h2("-H 'VERSION: h2'");
    assert!(
        marked.starts_with("HTTP/2 200") && marked.ends_with("local-echo"),
        "{marked}"
    );
    assert!(marked.contains("x-proto: HTTP/2.0"), "{marked}");

    // gRPC: a health check, its trailer included.
    let grpc = |header: &str| {
        in_cluster_sh(&format!(
            "printf '\\0\\0\\0\\0\\0' | curl -sS -m 5 --http2-prior-knowledge -H 'content-type: application/grpc' -H 'te: trailers' {header} --data-binary @- -D - -o /dev/null http://e2e-echo:9090/grpc.health.v1.Health/Check"
        ))
    };
    let g = grpc("");
    assert!(
        g.contains("x-served-by: cluster-echo") && g.contains("grpc-status: 0"),
        "{g}"
    );
    let g = grpc("-H 'VERSION: h2'");
    assert!(
        g.contains("x-served-by: local-echo") && g.contains("grpc-status: 0"),
        "{g}"
    );

    // One HTTP/1.1 keep-alive connection, three requests, routed one by one.
    let three = in_cluster_sh(&format!(
        "curl -sS -m 5 --http1.1 {url}a --next -H 'VERSION: h2' {url}b --next {url}c -w '%{{num_connects}}\\n'"
    ));
    assert_eq!(
        three, "cluster-echo\nlocal-echo\ncluster-echo\n0",
        "one connection, routed per request"
    );

    assert_eq!(k.stop(libc::SIGINT, Duration::from_secs(30)), Some(0));
    assert!(!svc_annotations("e2e-echo").contains("kt.dev/"));
}

#[test]
#[ignore = "needs root and the testbed: cargo xtask e2e runs it"]
/// manual mode: only a shadow carrying the workload's labels plus `version=<mark>` (for the
/// user's own Istio rules); the Service is not touched. Also exchange of a pod/x target.
fn mesh_manual_labels_a_shadow_and_exchange_takes_a_pod_target() {
    let _tb = testbed();
    seed_nginx();
    client_pod();
    let _local = LocalServer::start(80, LOCAL);
    let before = svc_spec("nginx");
    let mut k = Ktctl::spawn(&[
        "mesh",
        "deployment/nginx",
        "--expose",
        "80",
        "--mode",
        "manual",
        "--versionMark",
        "v2",
    ]);
    k.wait_for(
        "Now you can update Istio rule by label 'version=v2'",
        Duration::from_secs(120),
    );
    let out = k.output();
    let at = out
        .lines()
        .position(|l| l.contains("Istio rule"))
        .expect("banner");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[at - 1].ends_with(&"-".repeat(57)) && !lines[at - 1].ends_with(&"-".repeat(58)),
        "57 dashes:\n{out}"
    );
    let id = session_id(&k);
    let labels = kubectl(&[
        "get",
        "pod",
        "-l",
        &format!("kt.dev/session={id}"),
        "-o",
        "jsonpath={.items[0].metadata.labels}",
    ]);
    assert!(
        labels.contains(r#""app":"nginx""#) && labels.contains(r#""version":"v2""#),
        "{labels}"
    );
    assert_eq!(
        svc_spec("nginx"),
        before,
        "manual mode leaves the Service alone"
    );
    assert_eq!(k.stop(libc::SIGINT, Duration::from_secs(30)), Some(0));

    let pod = kubectl(&[
        "get",
        "pod",
        "-l",
        "app=nginx",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ]);
    let mut x = Ktctl::spawn(&["exchange", &format!("pod/{pod}"), "--expose", "80"]);
    x.wait_for(
        &format!("Now all request to pod '{pod}' will be redirected to local"),
        Duration::from_secs(120),
    );
    eventually("the local page", Duration::from_secs(30), || {
        from_cluster("http://nginx:80") == LOCAL
    });
    assert_eq!(x.stop(libc::SIGINT, Duration::from_secs(30)), Some(0));
    assert_eq!(svc_spec("nginx"), before);
}
