//! The session tools end to end: `recover`, `clean` and kt-connect's pid files. Each test
//! leaves a real leftover the way a crash does: ktctl killed with SIGKILL while its shadow
//! cannot act for it (its RoleBinding removed, so it can neither read its Lease nor restore).

mod common;

use std::time::Duration;

use common::*;
use kt_testbed::{Machine, Testbed};

const EXCHANGED: &str = "Now all request to service 'nginx' will be redirected to local";
const MESHED: &str = "Now you can access your service by header";
const NOTHING: &str = "No unavailing kt resource found (^.^)YYa!!";

/// Kills ktctl with SIGKILL after taking its shadow's rights: what the session changed stays.
fn crash(k: &mut Ktctl, id: &str) {
    kubectl(&["delete", "rolebinding", &format!("kt-connect-shadow-{id}")]);
    assert_eq!(k.stop(libc::SIGKILL, Duration::from_secs(10)), None);
}

/// A second Service to exchange or mesh beside nginx (same image, its own page).
fn second_service() {
    if !exists("deploy/e2e-tools") {
        kubectl(&[
            "create",
            "deployment",
            "e2e-tools",
            "--image=nginx:alpine",
            "--port=80",
        ]);
        kubectl(&["expose", "deployment", "e2e-tools", "--port=80"]);
    }
    kubectl(&["rollout", "status", "deploy/e2e-tools", "--timeout=90s"]);
}

fn exists(what: &str) -> bool {
    run_in(Machine::Laptop, &["kubectl", "get", what])
        .status
        .success()
}

#[test]
#[ignore = "needs root and the testbed: cargo xtask e2e runs it"]
/// `ktctl recover nginx` after a crashed exchange: refused while the session may still be alive,
/// then the Service exactly as before, the session and its lock gone; a second recover has
/// nothing to do; bad targets are usage errors.
fn recover_undoes_a_crashed_exchange_once_its_session_is_silent() {
    let _tb = testbed();
    seed_nginx();
    client_pod();
    let _local = LocalServer::start(80, LOCAL);
    let before = svc_spec("nginx");
    let mut k = Ktctl::spawn(&["exchange", "nginx", "--expose", "80", "--grace", "20"]);
    k.wait_for(EXCHANGED, Duration::from_secs(120));
    let id = session_id(&k);
    crash(&mut k, &id);
    assert_ne!(
        svc_spec("nginx"),
        before,
        "the crash left the Service exchanged"
    );

    let (code, out) = ktctl_exit(&["recover", "nginx"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!("session {id} (exchange by")) && out.contains("is alive"),
        "a session renewed within its grace is left alone, named: {out}"
    );
    assert!(svc_annotations("nginx").contains("kt.dev/original-selector"));

    let mut last = String::new();
    eventually(
        "recover to act once the session is silent for its grace",
        Duration::from_secs(60),
        || {
            let (code, out) = ktctl_exit(&["recover", "nginx"]);
            last = out;
            code == Some(0)
        },
    );
    assert!(
        last.contains("Restored the selector of service 'nginx'")
            && last.contains(&format!("Removed session {id}"))
            && last.contains("Removed lock nginx-kt-lock"),
        "{last}"
    );
    assert_eq!(svc_spec("nginx"), before);
    assert!(!svc_annotations("nginx").contains("kt.dev/"));
    assert!(!exists(&format!("lease/ktctl-{id}")));
    assert!(!exists("lease/nginx-kt-lock"));
    eventually(
        "the session's objects to go",
        Duration::from_secs(30),
        || session_objects(&format!("kt.dev/session={id}")).is_empty(),
    );
    eventually("the cluster page again", Duration::from_secs(30), || {
        from_cluster("http://nginx:80") == PAGE
    });

    let (code, out) = ktctl_exit(&["recover", "service/nginx"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("nothing to recover"), "{out}");
    let (code, out) = ktctl_exit(&["recover", "no-such-svc"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("service 'no-such-svc' not found"), "{out}");
    let (code, out) = ktctl_exit(&["recover", "deployment/nginx"]);
    assert_eq!(code, Some(2), "{out}");
}

#[test]
#[ignore = "needs root and the testbed: cargo xtask e2e runs it"]
/// `ktctl clean` after a crashed mesh, while another developer is connected: the dry run changes
/// nothing; the real run restores the Service and removes the dead session (its route, the
/// router and the stuntman with it) and never touches the live session.
fn clean_restores_a_crashed_mesh_and_exchange_and_leaves_a_live_session_alone() {
    let _tb = testbed();
    seed_nginx();
    second_service();
    client_pod();
    let _local = LocalServer::start(80, LOCAL);
    let before = svc_spec("nginx");
    let tools_before = svc_spec("e2e-tools");
    let live = Ktctl::connect(&[]);
    let live_id = session_id(&live);
    let mut x = Ktctl::spawn(&["exchange", "e2e-tools", "--expose", "80", "--grace", "5"]);
    x.wait_for(
        "Now all request to service 'e2e-tools' will be redirected to local",
        Duration::from_secs(120),
    );
    let x_id = session_id(&x);
    let mut k = Ktctl::spawn(&["mesh", "nginx", "--expose", "80", "--grace", "5"]);
    k.wait_for(MESHED, Duration::from_secs(120));
    let id = session_id(&k);
    crash(&mut x, &x_id);
    crash(&mut k, &id);

    let (code, out) = ktctl_exit(&["clean", "--thresholdInMinus", "0", "--dryRun"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        !out.contains(&id),
        "a session silent for less than twice its grace is alive: {out}"
    );

    let mut last = String::new();
    // Both crashed sessions: each counts as dead once silent for twice its grace, counted
    // from its own last renewal.
    eventually(
        "the crashed sessions to count as dead",
        Duration::from_secs(60),
        || {
            let (_, out) = ktctl_exit(&["clean", "--threshold-in-minus", "0", "--dry-run"]);
            last = out;
            last.contains(&format!("Would remove session {id}"))
                && last.contains(&format!("Would remove session {x_id}"))
        },
    );
    assert!(
        last.contains("Would restore the selector of service 'nginx' (meshed)"),
        "{last}"
    );
    assert!(!last.contains(&live_id), "{last}");
    assert!(
        svc_annotations("nginx").contains("kt.dev/mesh-router"),
        "the dry run changed nothing"
    );
    assert!(exists(&format!("lease/ktctl-{id}")));

    let (code, out) = ktctl_exit(&["clean", "--thresholdInMinus", "0"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("Restored the selector of service 'nginx' (meshed)")
            && out.contains(&format!("Removed session {id}"))
            && out.contains("Restored the selector of service 'e2e-tools' (taken by session")
            && out.contains(&format!("Removed session {x_id}")),
        "{out}"
    );
    // The exchange's lock is owned by its session: removing the session lets the garbage
    // collector take the lock too, and either may get there first.
    eventually("the exchange's lock to go", Duration::from_secs(30), || {
        !exists("lease/e2e-tools-kt-lock")
    });
    assert_eq!(svc_spec("e2e-tools"), tools_before);
    assert!(!out.contains(&live_id), "{out}");
    assert_eq!(svc_spec("nginx"), before);
    assert!(!svc_annotations("nginx").contains("kt.dev/"));
    eventually(
        "the dead session's route, router and stuntman to go",
        Duration::from_secs(30),
        || {
            session_objects(&format!("kt.dev/session={id}")).is_empty()
                && !exists("pod/nginx-kt-router")
                && !exists("service/nginx-kt-stuntman")
        },
    );
    assert!(
        exists(&format!("lease/ktctl-{live_id}")),
        "the live session"
    );
    assert_eq!(from_laptop("http://nginx:80"), PAGE, "{}", live.output());

    let (code, out) = ktctl_exit(&["clean", "--thresholdInMinus", "0"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(NOTHING), "{out}");
}

#[test]
#[ignore = "needs root and the testbed: cargo xtask e2e runs it"]
/// kt-connect's pid files: a running ktctl has `<command>-<pid>.pid`; removing it ends ktctl as
/// Ctrl-C does (exit 0, session removed); `clean --localOnly` removes only files of ended
/// processes.
fn a_removed_pid_file_ends_ktctl_and_clean_local_only_removes_stale_ones() {
    let tb: Testbed = testbed();
    let dir = tb.layout.kt_home(Machine::Laptop).join("pid");
    let mut k = Ktctl::connect(&[]);
    let id = session_id(&k);
    let file = dir.join(format!("connect-{}.pid", k.pid()));
    assert_eq!(
        std::fs::read_to_string(&file).expect("the pid file"),
        k.pid().to_string()
    );
    // A file of a process that has ended (a pid above the kernel's limit is never running).
    let stale = dir.join("exchange-4194305.pid");
    std::fs::write(&stale, "4194305").expect("stale file");

    let (code, out) = ktctl_exit(&["clean", "--localOnly", "--dryRun"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("Would remove") && out.contains("exchange-4194305.pid"),
        "{out}"
    );
    assert!(!out.contains(&format!("connect-{}", k.pid())), "{out}");
    assert!(stale.exists());
    let (code, out) = ktctl_exit(&["clean", "--local-only"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(!stale.exists(), "{out}");
    assert!(file.exists(), "the running ktctl's file stays");

    std::fs::remove_file(&file).expect("remove the pid file");
    assert_eq!(k.wait(Duration::from_secs(30)), Some(0), "{}", k.output());
    assert!(
        k.output().contains("Stopped (pid file removed)"),
        "{}",
        k.output()
    );
    assert_eq!(session_objects(&format!("kt.dev/session={id}")), "");
}

#[test]
#[ignore = "needs root and the testbed: cargo xtask e2e runs it"]
/// `ktctl status` lists a running ktctl with its context, namespace, session and what it
/// created; `ktctl stop <pid>` ends it as Ctrl-C does; bad pids are usage errors.
fn status_lists_running_ktctls_and_stop_ends_them_gracefully() {
    let _tb = testbed();
    let mut k = Ktctl::connect(&[]);
    let id = session_id(&k);
    let pid = k.pid().to_string();
    let (code, out) = ktctl_exit(&["status"]);
    assert_eq!(code, Some(0), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with(&pid))
        .unwrap_or_else(|| panic!("a line for pid {pid}: {out}"));
    for want in [
        "connect",
        "default",
        id.as_str(),
        &format!("pod/kt-connect-shadow-{id}"),
    ] {
        assert!(line.contains(want), "{want:?} in {line:?}");
    }
    let (code, json) = ktctl_exit(&["status", "-o", "json"]);
    assert_eq!(code, Some(0), "{json}");
    assert!(
        json.contains(&format!("\"session\": \"{id}\"")) && json.contains("\"running\": true"),
        "{json}"
    );

    let (code, out) = ktctl_exit(&["stop", "1"]);
    assert_eq!(code, Some(2), "pid 1 is not a ktctl: {out}");
    let (code, out) = ktctl_exit(&["stop"]);
    assert_eq!(code, Some(2), "{out}");
    let (code, out) = ktctl_exit(&["stop", "--all"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("Stopped connect (pid {pid})")),
        "{out}"
    );
    assert_eq!(k.wait(Duration::from_secs(10)), Some(0), "{}", k.output());
    assert!(k.output().contains("Interrupted"), "{}", k.output());
    assert_eq!(session_objects(&format!("kt.dev/session={id}")), "");
    let (_, out) = ktctl_exit(&["status"]);
    assert!(!out.contains(&pid), "{out}");
}

#[test]
#[ignore = "needs root and the testbed: cargo xtask e2e runs it"]
/// `ktctl birdseye` names what each live session does to which Service, and who is connected.
fn birdseye_shows_exchanged_and_previewed_services_and_who_is_connected() {
    let _tb = testbed();
    seed_nginx();
    let _local = LocalServer::start(80, LOCAL);
    let connected = Ktctl::connect(&[]);
    let connect_id = session_id(&connected);
    let mut ex = Ktctl::spawn(&["exchange", "nginx", "--expose", "80"]);
    ex.wait_for(EXCHANGED, Duration::from_secs(120));
    let ex_id = session_id(&ex);
    let mut pv = Ktctl::spawn(&["preview", "e2e-birdseye", "--expose", "80"]);
    pv.wait_for(
        "Now you can access your local service in cluster by name 'e2e-birdseye'",
        Duration::from_secs(120),
    );
    let pv_id = session_id(&pv);
    second_service();
    let _b_page = LocalServer::start(8081, "birdseye mesh");
    let mut me = Ktctl::spawn(&[
        "mesh",
        "e2e-tools",
        "--expose",
        "8081:80",
        "--versionMark",
        "e2e",
    ]);
    me.wait_for(MESHED, Duration::from_secs(120));
    let me_id = session_id(&me);

    let (code, out) = ktctl_exit(&["birdseye", "--showConnector", "--sortBy", "name"]);
    assert_eq!(code, Some(0), "{out}");
    let line = |svc: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("> {svc} - ")))
            .unwrap_or_else(|| panic!("a line for {svc}: {out}"))
            .to_string()
    };
    assert!(
        out.contains("---- Service in namespace default ----"),
        "{out}"
    );
    let l = line("nginx");
    assert!(l.contains("exchanged by [") && l.contains(&ex_id), "{l}");
    let l = line("e2e-birdseye");
    assert!(l.contains("previewing by [") && l.contains(&pv_id), "{l}");
    assert_eq!(line("kubernetes"), "> kubernetes - normal");
    let l = line("e2e-tools");
    assert!(
        l.contains("meshed (auto) by [") && l.contains(&me_id),
        "{l}"
    );
    assert!(
        !out.contains("e2e-tools-kt-stuntman") && !out.contains("e2e-tools-kt-mesh-e2e"),
        "ktctl's helpers are not listed: {out}"
    );
    assert!(
        out.contains("---- User connecting to cluster ----"),
        "{out}"
    );
    assert!(out.contains(&format!("session {connect_id})")), "{out}");

    let (code, out) = ktctl_exit(&[
        "birdseye",
        "--hideNaturalService",
        "--showConnector",
        "-o",
        "json",
    ]);
    assert_eq!(code, Some(0), "{out}");
    // stdout's JSON, without the log lines stderr interleaves (they start with the time).
    let json: String = out
        .lines()
        .filter(|l| !l.starts_with(|c: char| c.is_ascii_digit()))
        .collect::<Vec<_>>()
        .join("\n");
    let doc: serde_json::Value = serde_json::from_str(&json).expect(&json);
    let state = |svc: &str| {
        doc["services"]
            .as_array()
            .expect("services")
            .iter()
            .find(|s| s["service"] == svc)
            .map(|s| {
                (
                    s["state"].as_str().unwrap_or_default().to_string(),
                    s["by"][0]["session"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
    };
    assert_eq!(state("nginx"), Some(("exchanged".into(), ex_id.clone())));
    assert_eq!(
        state("e2e-tools"),
        Some(("meshed (auto)".into(), me_id.clone()))
    );
    assert_eq!(
        state("e2e-birdseye"),
        Some(("previewing".into(), pv_id.clone()))
    );
    assert_eq!(state("kubernetes"), None, "--hideNaturalService");
    assert!(
        doc["connectors"]
            .as_array()
            .expect("connectors")
            .iter()
            .any(|c| c["session"] == connect_id.as_str()),
        "{json}"
    );
    // As it happens: the mesh ends, and birdseye says so.
    drop(me);
    let (_, out) = ktctl_exit(&["birdseye"]);
    assert!(out.contains("> e2e-tools - normal"), "{out}");
    drop(pv);
    drop(ex);
}

#[test]
#[ignore = "needs root and the testbed: cargo xtask e2e runs it"]
/// `ktctl config` as kt-connect's users type it: `set` in its three forms, `get`, `show`,
/// `unset`, and the profile commands; the file is kt-connect's YAML layout.
fn config_and_its_profiles_work_in_kt_connects_forms() {
    let tb = testbed();
    let home = tb.layout.kt_home(Machine::Laptop);
    let _ = std::fs::remove_file(home.join("config"));
    let _ = std::fs::remove_dir_all(home.join("profile"));
    // Whatever happens, the next tests run without this config.
    struct Forget(std::path::PathBuf);
    impl Drop for Forget {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(self.0.join("config"));
            let _ = std::fs::remove_dir_all(self.0.join("profile"));
        }
    }
    let _forget = Forget(home.clone());
    let ok = |args: &[&str]| {
        let (code, out) = ktctl_exit(args);
        assert_eq!(code, Some(0), "{args:?}: {out}");
        out
    };
    ok(&["config", "set", "connect.dns-cache-ttl", "30"]);
    ok(&["config", "set", "exchange.recover-wait-time=60"]);
    ok(&["config", "set", "clean.threshold-in-minus", "=", "15"]);
    let yaml = std::fs::read_to_string(home.join("config")).expect("the config file");
    assert!(
        yaml.contains("connect:") && yaml.contains("dns-cache-ttl:") && yaml.contains("30"),
        "kt-connect's layout: {yaml}"
    );
    let out = ok(&[
        "config",
        "get",
        "exchange.recover-wait-time",
        "global.pod-creation-timeout",
    ]);
    assert!(out.contains("exchange.recover-wait-time = 60"), "{out}");
    assert!(
        out.contains("global.pod-creation-timeout = 60  (default)"),
        "{out}"
    );
    let out = ok(&["config", "show"]);
    assert!(out.contains("clean.threshold-in-minus = 15"), "{out}");
    let (code, out) = ktctl_exit(&["config", "set", "connect.dnsCacheTtl", "3"]);
    assert_eq!(code, Some(2), "camelCase is not an item name: {out}");
    let (code, out) = ktctl_exit(&["config", "set", "connect.dns-cache-ttl", "lots"]);
    assert_eq!(code, Some(2), "checked as the flag checks it: {out}");

    ok(&["config", "save-profile", "team-a"]);
    let out = ok(&["config", "list-profile"]);
    assert!(out.contains("team-a"), "{out}");
    ok(&["config", "unset", "--all"]);
    assert!(!ok(&["config", "show"]).contains("dns-cache-ttl"));
    let out = ok(&["config", "load-profile", "team-a", "--dryRun"]);
    assert!(out.contains("dns-cache-ttl"), "the profile's text: {out}");
    assert!(
        !ok(&["config", "show"]).contains("dns-cache-ttl"),
        "a dry run"
    );
    ok(&["config", "load-profile", "team-a"]);
    assert!(ok(&["config", "show"]).contains("connect.dns-cache-ttl = 30"));
    ok(&["config", "unset", "connect.dns-cache-ttl"]);
    assert!(!ok(&["config", "show"]).contains("dns-cache-ttl"));
    ok(&["config", "drop-profile", "team-a"]);
    let (code, out) = ktctl_exit(&["config", "load-profile", "team-a"]);
    assert_eq!(code, Some(2), "{out}");
}
