//! Helpers for the end-to-end tests: the testbed, commands in its machines, and a running
//! `ktctl connect` that is always stopped (Drop), also when a test fails.
#![allow(
    dead_code,
    reason = "each test file uses a different part of the harness"
)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kt_testbed::{Machine, Testbed, UpOptions, machine};

/// The seed walkthrough's page.
pub const PAGE: &str = "kt-connect cluster nginx service";

/// The testbed, up with two nodes.
pub fn testbed() -> Testbed {
    let tb = Testbed::default();
    tb.up(UpOptions { nodes: 2 }).expect("testbed up");
    tb
}

/// Where the workspace's binaries are (xtask builds them before running these tests).
pub fn workspace_bin(name: &str) -> PathBuf {
    let tb = Testbed::default();
    let p = tb.layout.bin().join(name);
    assert!(
        p.exists(),
        "{} is missing: run the e2e tests through `cargo xtask e2e` (it builds and links the binaries)",
        p.display()
    );
    p
}

/// Runs a command in a machine.
pub fn run_in(m: Machine, args: &[&str]) -> Output {
    let tb = Testbed::default();
    machine::output(&tb.layout, m, args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

pub fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Runs in the laptop and insists on success; returns stdout.
pub fn laptop_ok(args: &[&str]) -> String {
    let o = run_in(Machine::Laptop, args);
    assert!(
        o.status.success(),
        "{args:?} failed ({}): {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr),
        text(&o)
    );
    text(&o)
}

/// A shell line in the laptop.
pub fn laptop_sh(line: &str) -> Output {
    run_in(Machine::Laptop, &["sh", "-c", line])
}

/// kubectl in the laptop, insisting on success. A failed `wait` shows what it waited for:
/// `kubectl describe` of the objects (conditions, container states, events).
pub fn kubectl(args: &[&str]) -> String {
    let mut all = vec!["kubectl"];
    all.extend_from_slice(args);
    if args.first() == Some(&"wait") {
        let o = run_in(Machine::Laptop, &all);
        if !o.status.success() {
            let objects: Vec<&str> = args[1..]
                .iter()
                .copied()
                .filter(|a| !a.starts_with('-'))
                .collect();
            let mut describe = vec!["kubectl", "describe"];
            describe.extend(objects);
            let d = run_in(Machine::Laptop, &describe);
            panic!(
                "{all:?} failed ({}): {}\n{}\n{}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim(),
                text(&d),
                String::from_utf8_lossy(&d.stderr).trim()
            );
        }
        return text(&o);
    }
    laptop_ok(&all)
}

/// Whether a curl from the laptop (3 s at most) to `url` gets an answer.
pub fn laptop_reaches(url: &str) -> bool {
    run_in(Machine::Laptop, &["curl", "-sS", "-m", "3", url])
        .status
        .success()
}

/// The IP of the seed walkthrough's nginx pod.
pub fn nginx_pod_ip() -> String {
    kubectl(&[
        "get",
        "pod",
        "-l",
        "app=nginx",
        "-o",
        "jsonpath={.items[0].status.podIP}",
    ])
}

/// Polls until `f` is true or panics after `timeout` with `what`.
pub fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The seed's cluster half: nginx Deployment and Service with the walkthrough's page.
pub fn seed_nginx() {
    let exists = run_in(Machine::Laptop, &["kubectl", "get", "deploy/nginx"])
        .status
        .success();
    if !exists {
        kubectl(&[
            "create",
            "deployment",
            "nginx",
            "--image=nginx:alpine",
            "--port=80",
        ]);
        kubectl(&[
            "expose",
            "deployment",
            "nginx",
            "--port=80",
            "--target-port=80",
        ]);
    }
    kubectl(&["rollout", "status", "deploy/nginx", "--timeout=90s"]);
    kubectl(&[
        "exec",
        "deploy/nginx",
        "--",
        "/bin/sh",
        "-c",
        &format!("echo \"{PAGE}\" > /usr/share/nginx/html/index.html"),
    ]);
}

/// A `ktctl` process in the laptop; stopped with SIGINT (then SIGKILL) when dropped.
pub struct Ktctl {
    pub child: Option<Child>,
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl Ktctl {
    /// Starts `ktctl ARGS` in the laptop.
    pub fn spawn(args: &[&str]) -> Ktctl {
        let tb = Testbed::default();
        let mut cmd =
            machine::command(&tb.layout, Machine::Laptop, workspace_bin("ktctl")).expect("command");
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("KT_LOG", "info,ktctl=debug");
        let mut child = cmd.spawn().expect("ktctl starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stderr.take().expect("stderr")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().expect("stdout")),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    eprintln!("[ktctl] {line}");
                    lines.lock().expect("lines").push(line);
                }
            });
        }
        Ktctl {
            child: Some(child),
            lines,
        }
    }

    /// `ktctl connect ARGS`, returned once its banner is printed.
    pub fn connect(args: &[&str]) -> Ktctl {
        let mut all = vec!["connect"];
        all.extend_from_slice(args);
        Ktctl::connect_with(&all)
    }

    /// `ktctl ARGS` (a command line that runs connect, with flags before the command),
    /// returned once connect's banner is printed.
    pub fn connect_with(args: &[&str]) -> Ktctl {
        let mut k = Ktctl::spawn(args);
        k.wait_for(
            "All looks good, now you can access to resources in the kubernetes cluster",
            Duration::from_secs(120),
        );
        k
    }

    pub fn output(&self) -> String {
        self.lines.lock().expect("lines").join("\n")
    }

    /// Waits for a line containing `needle`; panics with the output if ktctl exits first.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        loop {
            if self
                .lines
                .lock()
                .expect("lines")
                .iter()
                .any(|l| l.contains(needle))
            {
                return;
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                std::thread::sleep(Duration::from_millis(200));
                panic!(
                    "ktctl exited ({st}) before printing {needle:?}:\n{}",
                    self.output()
                );
            }
            assert!(
                start.elapsed() < timeout,
                "no {needle:?} after {timeout:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Sends `sig` and waits for the exit code.
    pub fn stop(&mut self, sig: i32, timeout: Duration) -> Option<i32> {
        let child = self.child.as_ref()?;
        // SAFETY: kill(2) on the child this harness started.
        unsafe { libc::kill(child.id() as i32, sig) };
        self.wait(timeout)
    }

    /// Waits for exit (killing ktctl and failing after `timeout`); the exit code.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let mut child = self.child.take()?;
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                // Let the reader threads take the last lines.
                std::thread::sleep(Duration::from_millis(200));
                return st.code();
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                panic!("ktctl did not exit within {timeout:?}:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Ktctl {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the child this harness started.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(20) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The session id of a running ktctl, from its "Deploying shadow pod" line.
pub fn session_id(k: &Ktctl) -> String {
    let out = k.output();
    let line = out
        .lines()
        .find(|l| l.contains("Deploying shadow pod "))
        .expect("the deploy line");
    line.split("(session ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .expect("an id")
        .to_string()
}

/// The name of a running ktctl's first shadow pod, from its "Deploying shadow pod" line.
pub fn shadow_name(k: &Ktctl) -> String {
    let out = k.output();
    out.lines()
        .find_map(|l| l.split("Deploying shadow pod ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .expect("the deploy line")
        .to_string()
}

/// Objects of ktctl sessions in the namespace (all kinds ktctl makes).
pub fn session_objects(selector: &str) -> String {
    let o = run_in(
        Machine::Laptop,
        &[
            "kubectl",
            "get",
            "pods,secrets,serviceaccounts,roles,rolebindings,leases",
            "-l",
            selector,
            "-o",
            "name",
        ],
    );
    text(&o)
}

/// Programs attached to the laptop's cgroup (bpftool's view).
pub fn laptop_cgroup_programs() -> String {
    let cg = machine::cgroup(Machine::Laptop).expect("laptop cgroup");
    let o = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&cg)
        .output()
        .expect("bpftool");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Starts the API server again when dropped (also when the test fails).
pub struct ApiServerBack;

impl Drop for ApiServerBack {
    fn drop(&mut self) {
        Testbed::default()
            .start_component("kube-apiserver")
            .expect("the API server starts again");
    }
}

/// The seed walkthrough's local page.
pub const LOCAL: &str = "kt-connect local nginx service";

/// An nginx on the laptop's loopback serving `page` on `port`; stopped when dropped.
pub struct LocalServer {
    child: Child,
    dir: PathBuf,
}

impl LocalServer {
    pub fn start(port: u16, page: &str) -> LocalServer {
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
pub fn client_pod() -> &'static str {
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
pub fn from_cluster(url: &str) -> String {
    curl_in_cluster(url, &[])
}

/// A curl from the client pod with a header.
pub fn from_cluster_with(url: &str, header: &str) -> String {
    curl_in_cluster(url, &["-H", header])
}

fn curl_in_cluster(url: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "kubectl",
        "exec",
        "e2e-client",
        "--",
        "curl",
        "-sS",
        "-m",
        "5",
    ];
    args.extend_from_slice(extra);
    args.push(url);
    text(&run_in(Machine::Laptop, &args))
}

pub fn from_laptop(url: &str) -> String {
    text(&run_in(Machine::Laptop, &["curl", "-sS", "-m", "5", url]))
}

pub fn svc_spec(name: &str) -> String {
    kubectl(&["get", "svc", name, "-o", "jsonpath={.spec}"])
}

pub fn svc_annotations(name: &str) -> String {
    kubectl(&["get", "svc", name, "-o", "jsonpath={.metadata.annotations}"])
}

/// The exchange's shadow pod.
pub fn shadow_of(id: &str) -> String {
    kubectl(&[
        "get",
        "pods",
        "-l",
        &format!("kt.dev/session={id}"),
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ])
}

/// Runs ktctl to its end; the exit code and output.
pub fn ktctl_exit(args: &[&str]) -> (Option<i32>, String) {
    let mut k = Ktctl::spawn(args);
    let code = k.wait(Duration::from_secs(60));
    (code, k.output())
}
