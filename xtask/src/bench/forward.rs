//! The Kubernetes port-forward by direction: `ktctl forward` (one websocket to the kubelet
//! through the API server, no tunnel, no TLS of ktctl's own) to a pod that discards what it
//! gets on one port and sends zeros on another, one stream each way.
//!
//! Every ktctl path rides one such port-forward: `connect`'s bulk downloads come down it,
//! `exchange`'s go up it. Up is the costlier direction for the kubelet: a client's websocket
//! frames are masked, and the kubelet's websocket reader (apimachinery's wsstream on
//! golang.org/x/net/websocket) unmasks them a byte at a time and reads each message into a
//! buffer it grows as it goes, in one goroutine per connection. This path measures that
//! asymmetry alone, so that the report can tell it apart from the tunnel's own cost.

use std::time::Duration;

use anyhow::{Context, Result};

use super::Bench;
use super::load::{Values, push};
use super::process::{bg, laptop, with_output};

/// The pod at the far end: port 9000 discards, port 9001 sends zeros.
const POD: &str = "bench-pipe";
const SINK_PORT: u16 = 9000;
const SOURCE_PORT: u16 = 9001;
/// The laptop's ends of the two forwards.
const LOCAL_SINK: u16 = 18093;
const LOCAL_SOURCE: u16 = 18094;

/// One repeat: upload and download MiB/s through `ktctl forward`, into `values`.
pub(super) fn measure(b: &Bench, ktctl: &std::path::Path, values: &mut Values) -> Result<()> {
    pipe_pod(b)?;
    let forward = |local: u16, remote: u16| {
        bg(
            &b.tb,
            ktctl,
            &[
                "forward",
                &format!("pod/{POD}"),
                &format!("{local}:{remote}"),
            ],
            "Now you can access",
            Duration::from_secs(60),
        )
        .map(|(k, _)| k)
    };
    let sink = forward(LOCAL_SINK, SINK_PORT)?;
    let source = forward(LOCAL_SOURCE, SOURCE_PORT)?;
    // Four times the bulk file: long enough for a steady rate.
    let mib = (b.sizes.bulk_mib * 4).to_string();
    let xtask = b.xtask.to_str().context("non-UTF-8 path")?;
    let rate = |what: &str, port: u16| -> Result<f64> {
        let out = laptop(
            &b.tb,
            &[
                xtask,
                "bench-tool",
                what,
                &format!("127.0.0.1:{port}"),
                &mib,
            ],
        )?;
        out.trim()
            .parse()
            .with_context(|| format!("bench-tool {what} printed {out:?}"))
    };
    let up = with_output(&sink, || rate("send", LOCAL_SINK))?;
    let down = with_output(&source, || rate("receive", LOCAL_SOURCE))?;
    push(values, "upload_1_stream_mib_s", Some(up));
    push(values, "download_1_stream_mib_s", Some(down));
    Ok(())
}

/// The pipe pod on the nginx pod's node (where the shadows run), made once.
fn pipe_pod(b: &Bench) -> Result<()> {
    let found = laptop(
        &b.tb,
        &[
            "kubectl",
            "get",
            "pod",
            POD,
            "--ignore-not-found",
            "-o",
            "name",
        ],
    )?;
    if found.trim().is_empty() {
        let overrides = format!(
            r#"{{"apiVersion":"v1","spec":{{"nodeSelector":{{"kubernetes.io/hostname":"{}"}}}}}}"#,
            b.node
        );
        let script = format!(
            "socat -u TCP-LISTEN:{SINK_PORT},fork,reuseaddr OPEN:/dev/null,wronly & \
             exec socat -u OPEN:/dev/zero TCP-LISTEN:{SOURCE_PORT},fork,reuseaddr"
        );
        laptop(
            &b.tb,
            &[
                "kubectl",
                "run",
                POD,
                "--image=busybox:1",
                "--restart=Never",
                "--overrides",
                &overrides,
                "--",
                "sh",
                "-c",
                &script,
            ],
        )?;
    }
    laptop(
        &b.tb,
        &[
            "kubectl",
            "wait",
            &format!("pod/{POD}"),
            "--for=condition=Ready",
            "--timeout=90s",
        ],
    )?;
    Ok(())
}
