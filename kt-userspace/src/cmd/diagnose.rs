//! `ktctl diagnose`: whether this machine can run `connect`, and how good the way to the
//! cluster is: tunnel round trips, throughput to the shadow, DNS answer time, hook status.

use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use kt_common::tunnel::{read_data, write_data};
use kt_common::wire::Open;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cli::{DiagnoseArgs, Global};
use crate::cluster::{CONNECT_PERMISSIONS, Kube, Target};
use crate::error::{Error, Result};
use crate::tunnel::Tunnel;

fn line(what: &str, verdict: &str) {
    println!("  {what:<34} {verdict}");
}

/// Checks what `connect` needs locally; returns whether all is well.
fn machine() -> bool {
    println!("This machine");
    let kernel = crate::preflight::kernel_version();
    line(
        "kernel",
        &kernel
            .map(|(a, b)| {
                format!(
                    "Linux {a}.{b}{}",
                    if (a, b) >= crate::preflight::MIN_KERNEL {
                        String::new()
                    } else {
                        let (x, y) = crate::preflight::MIN_KERNEL;
                        format!(" (too old: {x}.{y} needed)")
                    }
                )
            })
            .unwrap_or_else(|| "unknown".into()),
    );
    let pre = crate::preflight::check();
    line(
        "privileges, cgroup v2, kernel",
        &match &pre {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("PROBLEM: {e}"),
        },
    );
    match crate::cgroup::target(None) {
        Ok(p) => line("hooks would attach to", &p.display().to_string()),
        Err(e) => line("hooks would attach to", &format!("PROBLEM: {e}")),
    }
    let loaded: Vec<String> = aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .filter_map(|p| p.name_as_str().map(str::to_string))
        .filter(|n| n.starts_with("kt_"))
        .collect();
    line(
        "ktctl programs in the kernel",
        &if loaded.is_empty() {
            "none (no connect running)".to_string()
        } else {
            format!("{} ({})", loaded.len(), loaded.join(" "))
        },
    );
    pre.is_ok()
}

pub async fn run(global: &Global, args: &DiagnoseArgs) -> Result<u8> {
    let machine_ok = machine();
    println!("Cluster");
    let kube = Kube::connect(&Target {
        kubeconfig: global.kubeconfig.clone(),
        context: global.context.clone(),
        namespace: global.namespace.clone(),
    })
    .await?;
    line(
        "API server",
        &format!(
            "{} ({}), context {}",
            kube.server,
            kube.server_ips
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(" "),
            kube.context
        ),
    );
    let perms = kube.require(CONNECT_PERMISSIONS).await;
    line(
        "permissions in namespace",
        &match &perms {
            Ok(()) => format!("{}: ok", kube.namespace),
            Err(e) => format!("PROBLEM: {e}"),
        },
    );
    let cidrs = kube.cidrs(true).await?;
    line(
        "cluster CIDRs",
        &cidrs
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(" "),
    );
    perms?;
    let opts = super::shadow_options(global)?;
    let interrupts = crate::interrupt::Interrupts::install("diagnose")
        .map_err(|e| Error::io("handling signals", e))?;
    let report = super::with_shadow(
        &kube,
        &opts,
        "diagnose",
        Duration::from_secs(30),
        Duration::from_secs(global.port_forward_timeout),
        &interrupts,
        super::Signals::EndBody,
        async |_session, tunnel| measure(tunnel, args).await,
    )
    .await?;
    println!("Tunnel (port-forward, TLS 1.3, yamux)");
    for (k, v) in &report {
        line(k, v);
    }
    let problem = report.iter().any(|(_, v)| v.starts_with("PROBLEM"));
    Ok(match (machine_ok, problem) {
        (false, _) => 2,
        (true, true) => 1,
        (true, false) => 0,
    })
}

async fn measure(tunnel: &Tunnel, args: &DiagnoseArgs) -> Result<Vec<(String, String)>> {
    let mut out = vec![];
    let io = |e: std::io::Error| Error::io("diagnose", e);
    // Round trips: one echo stream, `pings` 64-byte messages.
    let mut echo = tunnel.request(Open::Echo).await?;
    let msg = [0x6bu8; 64];
    let mut back = [0u8; 64];
    let mut rtts = Vec::with_capacity(args.pings as usize);
    for _ in 0..args.pings {
        let t = Instant::now();
        echo.write_all(&msg).await.map_err(io)?;
        echo.read_exact(&mut back).await.map_err(io)?;
        rtts.push(t.elapsed());
    }
    drop(echo);
    let sum: Duration = rtts.iter().sum();
    let (min, max) = (
        rtts.iter().min().copied().unwrap_or_default(),
        rtts.iter().max().copied().unwrap_or_default(),
    );
    out.push((
        format!("round trip ({} pings)", args.pings),
        format!(
            "min {min:.2?} avg {:.2?} max {max:.2?}",
            sum / rtts.len().max(1) as u32
        ),
    ));
    if let Some(rtt) = tunnel.session().await?.rtt() {
        out.push(("keepalive round trip".into(), format!("{rtt:.2?}")));
    }
    // Throughput both ways.
    let bytes = args.mib * 1024 * 1024;
    let t = Instant::now();
    let mut down = tunnel.request(Open::Source { bytes }).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = down.read(&mut buf).await.map_err(io)?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    out.push((
        "throughput from the shadow".into(),
        format!(
            "{:.1} MiB/s ({} MiB)",
            got as f64 / 1048576.0 / t.elapsed().as_secs_f64(),
            got >> 20
        ),
    ));
    let t = Instant::now();
    let mut up = tunnel.request(Open::Sink).await?;
    let chunk = vec![0u8; 256 * 1024];
    let mut sent = 0u64;
    while sent < bytes {
        let n = chunk.len().min((bytes - sent) as usize);
        up.write_all(&chunk[..n]).await.map_err(io)?;
        sent += n as u64;
    }
    up.shutdown().await.map_err(io)?;
    let mut count = [0u8; 8];
    up.read_exact(&mut count).await.map_err(io)?;
    out.push((
        "throughput to the shadow".into(),
        format!(
            "{:.1} MiB/s ({} MiB)",
            u64::from_be_bytes(count) as f64 / 1048576.0 / t.elapsed().as_secs_f64(),
            sent >> 20
        ),
    ));
    // The cluster's DNS through the shadow.
    let name = format!(
        "kubernetes.default.svc.{}.",
        args.cluster_domain.trim_matches('.')
    );
    let mut q = Message::query();
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(
        Name::from_ascii(&name).map_err(|e| Error::Runtime(e.to_string()))?,
        RecordType::A,
    ));
    let bytes = q.to_vec().map_err(|e| Error::Runtime(e.to_string()))?;
    let t = Instant::now();
    let mut st = tunnel.request(Open::Dns).await?;
    write_data(&mut st, &bytes).await?;
    let verdict = match read_data(&mut st).await? {
        Some(answer) => match Message::from_vec(&answer) {
            Ok(m) => format!(
                "{:.2?} ({name}: {:?}, {} answer(s))",
                t.elapsed(),
                m.metadata.response_code,
                m.answers.len()
            ),
            Err(e) => format!("PROBLEM: bad answer: {e}"),
        },
        None => "PROBLEM: no answer".into(),
    };
    out.push(("cluster DNS answer".into(), verdict));
    Ok(out)
}
