//! `ktctl connect` under faults, on the testbed: the shadow pod deleted or replaced by an
//! impostor, the API server away for longer than the grace period, signals at every stage.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kt_testbed::Machine;

fn curl_works() -> bool {
    run_in(Machine::Laptop, &["curl", "-sS", "-m", "5", "http://nginx"])
        .status
        .success()
}

fn shadow_pods(id: &str) -> Vec<String> {
    kubectl(&[
        "get",
        "pods",
        "-l",
        &format!("kt.dev/session={id}"),
        "-o",
        "jsonpath={range .items[*]}{.metadata.name}{\"\\n\"}{end}",
    ])
    .lines()
    .map(str::to_string)
    .filter(|l| !l.is_empty())
    .collect()
}

#[test]
#[ignore = "needs root and the testbed: cargo xtask e2e runs it"]
/// Regression: a deleted shadow left ktctl retrying a port-forward to the dead pod's name
/// every 5 s forever; and the shadow's key sat in a Secret that any pod could mount.
fn a_deleted_shadow_is_replaced_and_an_impostor_of_the_same_name_gets_no_traffic() {
    let _tb = testbed();
    seed_nginx();
    // What an earlier failed run may have left.
    kubectl(&["delete", "pod", "-l", "e2e=impostor", "--ignore-not-found"]);
    kubectl(&["delete", "secret", "e2e-any-secret", "--ignore-not-found"]);
    let mut k = Ktctl::connect(&[]);
    let id = session_id(&k);
    let first = format!("kt-connect-shadow-{id}");
    assert_eq!(shadow_pods(&id), vec![first.clone()]);
    assert_eq!(
        kubectl(&[
            "get",
            "secrets",
            "-l",
            &format!("kt.dev/session={id}"),
            "-o",
            "name"
        ]),
        "",
        "no Secret holds the shadow's key"
    );

    // Delete the shadow: ktctl notices, starts a new one, and requests work again.
    let deleted = Instant::now();
    kubectl(&["delete", "pod", &first, "--wait=false"]);
    k.wait_for(
        "starting a new shadow for this session",
        Duration::from_secs(30),
    );
    eventually(
        "requests to work again",
        Duration::from_secs(30),
        curl_works,
    );
    assert!(
        deleted.elapsed() < Duration::from_secs(30),
        "took {:?}",
        deleted.elapsed()
    );
    let second = format!("kt-connect-shadow-{id}-1");
    k.wait_for(
        &format!("New shadow pod {second} is ready"),
        Duration::from_secs(5),
    );

    // Replace the current shadow with an impostor: the same name and labels, the session's
    // client CA, a kt-router of its own, and every Secret of the namespace mounted.
    let ca = kubectl(&[
        "get",
        "pod",
        &second,
        "-o",
        "jsonpath={.spec.containers[0].env[?(@.name==\"KT_CLIENT_CA\")].value}",
    ]);
    assert!(ca.contains("BEGIN CERTIFICATE"), "{ca}");
    kubectl(&[
        "create",
        "secret",
        "generic",
        "e2e-any-secret",
        "--from-literal=k=v",
    ]);
    kubectl(&[
        "delete",
        "pod",
        &second,
        "--wait=true",
        "--grace-period=0",
        "--force",
    ]);
    let impostor = format!(
        r#"kubectl apply -f - <<'EOF'
apiVersion: v1
kind: Pod
metadata:
  name: {second}
  labels: {{app.kubernetes.io/managed-by: ktctl, kt.dev/session: "{id}", kt.dev/role: shadow-connect, e2e: impostor}}
spec:
  restartPolicy: Never
  containers:
  - name: shadow
    image: kt-router:impostor
    args: ["shadow", "--session={id}", "--health-port=7444"]
    env: [{{name: KT_CLIENT_CA, value: {ca}}}, {{name: KT_LOG, value: debug}}]
    volumeMounts: [{{name: s, mountPath: /etc/kt/tls}}]
  volumes: [{{name: s, secret: {{secretName: e2e-any-secret}}}}]
EOF"#,
        ca = serde_json::to_string(&ca).expect("json")
    );
    let o = laptop_sh(&impostor);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    kubectl(&[
        "wait",
        "--for=condition=Ready",
        &format!("pod/{second}"),
        "--timeout=60s",
    ]);
    // ktctl refuses the impostor (another UID) and starts its own third shadow.
    let third = format!("kt-connect-shadow-{id}-2");
    k.wait_for(
        &format!("New shadow pod {third} is ready"),
        Duration::from_secs(60),
    );
    eventually(
        "requests to work through the new shadow",
        Duration::from_secs(30),
        curl_works,
    );
    for _ in 0..5 {
        assert!(curl_works());
    }
    let logs = kubectl(&["logs", &second]);
    assert!(logs.contains("shadow ready"), "the impostor ran:\n{logs}");
    assert!(
        !logs.contains("client connected"),
        "ktctl talked to the impostor:\n{logs}"
    );
    kubectl(&["delete", "pod", &second, "--wait=true"]);
    kubectl(&["delete", "secret", "e2e-any-secret"]);
    assert_eq!(k.stop(libc::SIGINT, Duration::from_secs(30)), Some(0));
    assert_eq!(session_objects(&format!("kt.dev/session={id}")), "");
}

use kt_testbed::Testbed;

/// Thaws the API server when dropped (also when the test fails).
struct ApiServerThawed;

impl Drop for ApiServerThawed {
    fn drop(&mut self) {
        Testbed::default()
            .freeze_component("kube-apiserver", false)
            .expect("the API server thaws");
    }
}

#[test]
#[ignore = "needs root and the testbed: cargo xtask e2e runs it"]
/// Regression: the shadow ended a live session when the API server was away for longer than
/// the grace period, because the first read after the outage found the Lease stale.
fn an_api_server_outage_of_twice_the_grace_period_does_not_end_the_session() {
    let tb = testbed();
    seed_nginx();
    let grace = 10u64;
    let mut k = Ktctl::connect(&["--grace", &grace.to_string()]);
    let id = session_id(&k);
    let objects = session_objects(&format!("kt.dev/session={id}"));
    {
        let _back = ApiServerBack;
        tb.stop_component("kube-apiserver")
            .expect("stop the API server");
        // The outage itself is what is tested: twice the grace period.
        std::thread::sleep(Duration::from_secs(2 * grace));
    }
    // Back: the session and its objects are still there a full grace period later, and new
    // requests work.
    eventually(
        "requests to work after the outage",
        Duration::from_secs(60),
        curl_works,
    );
    std::thread::sleep(Duration::from_secs(grace + 5));
    assert_eq!(session_objects(&format!("kt.dev/session={id}")), objects);
    assert!(curl_works(), "{}", k.output());
    assert!(
        k.child
            .as_mut()
            .expect("running")
            .try_wait()
            .expect("wait")
            .is_none()
    );
    assert_eq!(k.stop(libc::SIGINT, Duration::from_secs(30)), Some(0));
    assert_eq!(session_objects(&format!("kt.dev/session={id}")), "");
}

#[test]
#[ignore = "needs root and the testbed: cargo xtask e2e runs it"]
/// Regression: Ctrl-C while the shadow was still scheduling killed ktctl on the spot and left
/// the session's objects; a cleanup that hung on an unreachable API server could not be left.
fn signals_at_any_moment_clean_up_and_a_second_one_leaves_a_hung_cleanup() {
    let tb = testbed();
    seed_nginx();
    let before = session_objects("app.kubernetes.io/managed-by=ktctl");
    // Stops ktctl with `sig` once it printed `stage`: exit 1, everything removed.
    let interrupt_at = |args: &[&str], stage: &str, sig: i32| {
        let mut k = Ktctl::spawn(args);
        k.wait_for(stage, Duration::from_secs(60));
        assert_eq!(
            k.stop(sig, Duration::from_secs(30)),
            Some(1),
            "{}",
            k.output()
        );
        assert!(
            k.output().contains("Deleted lease/ktctl-"),
            "{}",
            k.output()
        );
        assert_eq!(
            session_objects("app.kubernetes.io/managed-by=ktctl"),
            before
        );
    };
    // While the shadow cannot be scheduled (no node has this label).
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        let args = ["connect", "--nodeSelector", "kt.dev/e2e=nowhere"];
        interrupt_at(&args, "Waiting for pod", sig);
    }
    // During diagnose's measurements.
    interrupt_at(&["diagnose", "--mib", "16384"], "tunnel up", libc::SIGINT);

    // With -- CMD, SIGHUP goes to CMD, whose exit ends the session.
    let mut k = Ktctl::spawn(&[
        "connect",
        "--",
        "sh",
        "-c",
        "trap 'echo got-hup; exit 9' HUP; echo cmd-started; while :; do sleep 0.1; done",
    ]);
    k.wait_for("cmd-started", Duration::from_secs(120));
    assert_eq!(
        k.stop(libc::SIGHUP, Duration::from_secs(30)),
        Some(9),
        "{}",
        k.output()
    );
    assert!(k.output().contains("got-hup"), "{}", k.output());

    // A cleanup that hangs (the API server is frozen: calls hang, they do not fail): a second
    // Ctrl-C leaves at once and says what may be left.
    let mut k = Ktctl::connect(&["--grace", "5"]);
    let id = session_id(&k);
    {
        let _thaw = ApiServerThawed;
        tb.freeze_component("kube-apiserver", true)
            .expect("freeze the API server");
        // SAFETY: kill(2) on the ktctl this test started.
        unsafe { libc::kill(k.pid(), libc::SIGINT) };
        k.wait_for("Cleaning up session", Duration::from_secs(20));
        let second = Instant::now();
        assert_eq!(
            k.stop(libc::SIGINT, Duration::from_secs(5)),
            Some(1),
            "{}",
            k.output()
        );
        assert!(second.elapsed() < Duration::from_secs(3));
        let out = k.output();
        assert!(
            out.contains("exiting before the cleanup finished")
                && out.contains(&format!("lease/ktctl-{id}"))
                && out.contains("ktctl clean"),
            "{out}"
        );
    }
    // The shadow ends the abandoned session after the grace period.
    eventually(
        "the abandoned session's objects to go",
        Duration::from_secs(60),
        || session_objects(&format!("kt.dev/session={id}")).is_empty(),
    );
}

/// `ktctl-*` cgroups under the laptop's cgroup.
fn ktctl_cgroups() -> Vec<std::path::PathBuf> {
    let cg = kt_testbed::machine::cgroup(Machine::Laptop).expect("laptop cgroup");
    std::fs::read_dir(&cg)
        .expect("cgroup")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("ktctl-"))
        .map(|e| e.path())
        .collect()
}

/// Kills what is left in the given cgroups and removes them (also when the test fails).
struct CgroupsGone(Vec<std::path::PathBuf>);

impl Drop for CgroupsGone {
    fn drop(&mut self) {
        for cg in &self.0 {
            let _ = std::fs::write(cg.join("cgroup.kill"), "1");
            for _ in 0..100 {
                if std::fs::remove_dir(cg).is_ok() || !cg.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[test]
#[ignore = "needs root and the testbed: cargo xtask e2e runs it"]
/// Regression: `kill -9` of `ktctl connect -- CMD` left its cgroup behind for good.
fn the_cgroup_a_killed_ktctl_left_is_reported_while_busy_and_removed_once_empty() {
    let _tb = testbed();
    seed_nginx();
    assert!(ktctl_cgroups().is_empty(), "{:?}", ktctl_cgroups());
    let mut k = Ktctl::spawn(&[
        "connect",
        "--grace",
        "5",
        "--",
        "sh",
        "-c",
        "echo cmd-up; sleep 600",
    ]);
    k.wait_for("cmd-up", Duration::from_secs(120));
    let left = ktctl_cgroups();
    let _gone = CgroupsGone(left.clone());
    assert_eq!(left.len(), 1, "{left:?}");
    k.stop(libc::SIGKILL, Duration::from_secs(10));
    // CMD (sh and its sleep) outlived ktctl in the cgroup.
    let procs = std::fs::read_to_string(left[0].join("cgroup.procs")).expect("procs");
    let pids: Vec<i32> = procs
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    assert!(!pids.is_empty());
    // The next ktctl names the processes and leaves them alone.
    let mut next = Ktctl::connect(&[]);
    assert!(
        next.output()
            .contains("was left by a ktctl that was killed and still holds processes"),
        "{}",
        next.output()
    );
    assert!(left[0].exists());
    assert_eq!(next.stop(libc::SIGINT, Duration::from_secs(30)), Some(0));
    for pid in &pids {
        // SAFETY: kill(2) on CMD's processes, which this test started through ktctl.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    eventually("CMD's processes to end", Duration::from_secs(10), || {
        std::fs::read_to_string(left[0].join("cgroup.procs")).is_ok_and(|p| p.trim().is_empty())
    });
    // Once empty, the next ktctl removes it.
    let mut next = Ktctl::connect(&[]);
    assert!(!left[0].exists(), "{}", next.output());
    assert!(
        next.output().contains("Removed cgroup ktctl-"),
        "{}",
        next.output()
    );
    assert_eq!(next.stop(libc::SIGINT, Duration::from_secs(30)), Some(0));
}
