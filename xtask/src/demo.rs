//! `cargo xtask demo`: the seed walkthrough on the testbed, printing each step.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kt_testbed::{Machine, Testbed, UpOptions, machine};

fn step(what: &str) {
    eprintln!("\n\x1b[1m>>> {what}\x1b[0m");
}

/// Runs a shell line in the laptop, echoing it; fails if it fails.
fn laptop(tb: &Testbed, line: &str) -> Result<String> {
    eprintln!("laptop$ {line}");
    let out = machine::output(&tb.layout, Machine::Laptop, &["sh", "-c", line])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprint!("{text}");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("`{line}` failed ({})", out.status);
    }
    Ok(text)
}

pub fn run() -> Result<()> {
    crate::setup::run()?;
    step("Building ktctl and kt-router");
    crate::build::binaries(false)?;
    step("Bringing up the testbed (a real Kubernetes control plane, pods as processes)");
    let tb = Testbed::default();
    tb.up(UpOptions { nodes: 1 })?;

    step("In the cluster: the seed's nginx Service");
    let exists = machine::output(
        &tb.layout,
        Machine::Laptop,
        &["kubectl", "get", "deploy/nginx"],
    )?
    .status
    .success();
    if !exists {
        laptop(
            &tb,
            "kubectl create deployment nginx --image=nginx:alpine --port=80",
        )?;
        laptop(
            &tb,
            "kubectl expose deployment nginx --port=80 --target-port=80",
        )?;
    }
    laptop(&tb, "kubectl rollout status deployment/nginx --timeout=90s")?;
    laptop(
        &tb,
        "kubectl exec deploy/nginx -- /bin/sh -c 'echo \"kt-connect cluster nginx service\" > /usr/share/nginx/html/index.html'",
    )?;

    step("On the developer's machine, without ktctl, the cluster is out of reach");
    let _ = laptop(
        &tb,
        "curl -sS -m 3 http://nginx:80 || echo '(as expected: no such host)'",
    );

    step("laptop$ ktctl connect");
    let mut cmd = machine::command(&tb.layout, Machine::Laptop, tb.layout.bin().join("ktctl"))?;
    cmd.arg("connect")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .stdout(Stdio::null());
    let mut child = cmd.spawn().context("starting ktctl")?;
    let stderr = child.stderr.take().context("ktctl's stderr")?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("  {line}");
            let _ = tx.send(line);
        }
    });
    let start = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(l) if l.contains("All looks good") => break,
            Ok(_) => {}
            Err(_) if start.elapsed() > Duration::from_secs(120) => {
                let _ = child.kill();
                bail!("ktctl connect did not get ready in 120 s");
            }
            Err(_) => {
                if let Some(st) = child.try_wait()? {
                    bail!("ktctl connect exited ({st})");
                }
            }
        }
    }
    std::thread::sleep(Duration::from_millis(300));

    step("Now every program on the laptop reaches the cluster");
    let cluster_ip = laptop(
        &tb,
        "kubectl get svc nginx -o jsonpath='{.spec.clusterIP}'; echo",
    )?;
    let result = (|| -> Result<()> {
        laptop(&tb, "curl -sS http://nginx:80")?;
        laptop(&tb, "curl -sS http://nginx.default.svc.cluster.local")?;
        laptop(&tb, &format!("curl -sS http://{}", cluster_ip.trim()))?;
        laptop(
            &tb,
            "getent hosts home.test   # the laptop's own DNS still answers",
        )?;
        Ok(())
    })();

    step("Ctrl-C: ktctl removes everything it made");
    // SAFETY: kill(2) on the child this process started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait()?;
    std::thread::sleep(Duration::from_millis(300));
    result?;
    if !status.success() {
        bail!("ktctl exited with {status}");
    }
    eprintln!(
        "\nThe testbed stays up. Try it yourself:\n  cargo xtask testbed exec laptop -- ktctl connect\n  cargo xtask testbed exec laptop -- curl http://nginx\n  cargo xtask testbed down"
    );
    Ok(())
}
