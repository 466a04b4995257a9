//! `exchange`, `preview` and `forward` end to end: cluster traffic to the laptop and back, from
//! the seed walkthrough, with a local nginx on the laptop and a client pod in the cluster.

mod common;

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use kt_testbed::{Machine, Testbed, machine};

/// The seed walkthrough's local page.
const LOCAL: &str = "kt-connect local nginx service";

/// An nginx on the laptop's loopback serving `page` on `port`; stopped when dropped.
struct LocalServer {
    child: Child,
    dir: PathBuf,
}

impl LocalServer {
    fn start(port: u16, page: &str) -> LocalServer {
        let dir = std::env::temp_dir().join(format!("kt-e2e-local-{port}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("index.html"), format!("{page}\n")).expect("page");
        let d = dir.display();
        let conf = format!(
            "daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid; error_log stderr;\n\
             events {{ worker_connections 1024; }}\n\
             http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};\n\
             uwsgi_temp_path {d}; scgi_temp_path {d};\n\
             server {{ listen 127.0.0.1:{port}; root {d}; }} }}\n"
        );
        std::fs::write(dir.join("nginx.conf"), conf).expect("conf");
        let tb = Testbed::default();
        let mut cmd = machine::command(&tb.layout, Machine::Laptop, "nginx").expect("command");
        cmd.args(["-e", "stderr", "-c"])
            .arg(dir.join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let child = cmd.spawn().expect("nginx starts");
        let s = LocalServer { child, dir };
        eventually("the local nginx", Duration::from_secs(10), || {
            laptop_reaches(&format!("http://127.0.0.1:{port}/"))
        });
        s
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A long-running client pod in the cluster (curl from inside).
fn client_pod() -> &'static str {
    let exists = run_in(Machine::Laptop, &["kubectl", "get", "pod", "e2e-client"])
        .status
        .success();
    if !exists {
        kubectl(&[
            "run",
            "e2e-client",
            "--image=busybox:1",
            "--restart=Never",
            "--",
            "sleep",
            "infinity",
        ]);
    }
    kubectl(&[
        "wait",
        "pod/e2e-client",
        "--for=condition=Ready",
        "--timeout=60s",
    ]);
    "e2e-client"
}

/// What a curl from the client pod gets (empty on failure).
fn from_cluster(url: &str) -> String {
    let o = run_in(
        Machine::Laptop,
        &[
            "kubectl",
            "exec",
            "e2e-client",
            "--",
            "curl",
            "-sS",
            "-m",
            "5",
            url,
        ],
    );
    text(&o)
}

fn from_laptop(url: &str) -> String {
    text(&run_in(Machine::Laptop, &["curl", "-sS", "-m", "5", url]))
}

fn svc_spec(name: &str) -> String {
    kubectl(&["get", "svc", name, "-o", "jsonpath={.spec}"])
}

fn svc_annotations(name: &str) -> String {
    kubectl(&["get", "svc", name, "-o", "jsonpath={.metadata.annotations}"])
}

/// The exchange's shadow pod.
fn shadow_of(id: &str) -> String {
    kubectl(&[
        "get",
        "pods",
        "-l",
        &format!("kt.dev/session={id}"),
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ])
}

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

    let leases_before = kubectl(&["get", "leases", "-l", "kt.dev/role=anchor", "-o", "name"]);
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
    assert_eq!(
        kubectl(&["get", "leases", "-l", "kt.dev/role=anchor", "-o", "name"]),
        leases_before,
        "the second exchange created no session"
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

/// A curl from the client pod with a header.
fn from_cluster_with(url: &str, header: &str) -> String {
    let o = run_in(
        Machine::Laptop,
        &[
            "kubectl",
            "exec",
            "e2e-client",
            "--",
            "curl",
            "-sS",
            "-m",
            "5",
            "-H",
            header,
            url,
        ],
    );
    text(&o)
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
