//! The mesh role: an HTTP header router in front of a Service that developers share.
//!
//! `ktctl mesh <svc>` points the Service's selector at this router and keeps the original pods
//! behind a "stuntman" Service (the `--default` upstream). Each developer adds a route: a
//! ConfigMap labelled `kt.dev/mesh-of=<svc>` whose `header`, `value` and `target` keys say
//! that requests carrying `header: value` go to `target`, on the port they came in on.
//! Everything else, and every connection that does not speak HTTP, goes to the default.
//! When no route has been left for `--idle-grace`, the router puts the Service's selector back
//! and exits.
//!
//! Layout:
//! - [`routes`]: the route ConfigMaps, the table the proxy asks, the fold of the watch's events;
//! - [`proxy`]: the listeners: sniffing, per-request routing of HTTP/1 and HTTP/2, raw splicing;
//! - [`restore`]: the idle clock and the restore of the Service.

pub(crate) mod proxy;
mod restore;
pub(crate) mod routes;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::net::TcpListener;
use tokio::sync::watch;

use self::routes::{Host, RouteBook, Routes};
use crate::shadow;

/// The label of a route ConfigMap: the name of the meshed Service.
pub const LABEL_MESH_OF: &str = kt_common::changes::MESH_OF;

/// `kt-router mesh`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Ports to route, comma-separated; each request goes on to the same port upstream
    #[arg(long, required = true, value_delimiter = ',', value_parser = clap::value_parser!(u16).range(1..))]
    ports: Vec<u16>,
    /// Where requests that match no route go (the stuntman Service's DNS name)
    #[arg(long = "default", value_name = "HOST")]
    default_host: String,
    /// The meshed Service: routes are the ConfigMaps labelled kt.dev/mesh-of=<service>
    #[arg(long)]
    service: String,
    /// Namespace of the Service and its routes
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
    /// Seconds without any route after which the Service is restored and the router exits
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    idle_grace: u64,
    /// Port of the readiness listener (0: none)
    #[arg(long, default_value_t = shadow::HEALTH_PORT)]
    health_port: u16,
}

pub async fn run(args: Args) -> Result<()> {
    let default = Host::parse(&args.default_host).context("--default")?;
    let mut ports = args.ports.clone();
    ports.sort_unstable();
    ports.dedup();
    let mut listeners = Vec::with_capacity(ports.len());
    for &port in &ports {
        let l = TcpListener::bind(("0.0.0.0", port))
            .await
            .with_context(|| format!("listening on port {port} (--ports)"))?;
        listeners.push((l, port));
    }
    // Bound after the proxy's listeners, so that Ready means they accept.
    let health =
        shadow::health_listener(std::net::Ipv4Addr::UNSPECIFIED.into(), args.health_port).await?;
    let client = kube::Client::try_default()
        .await
        .context("connecting to the API server")?;
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &args.namespace);
    let services: Api<Service> = Api::namespaced(client, &args.namespace);

    let routes = Arc::new(Routes::default());
    let (known, known_rx) = watch::channel(None);
    let proxies = futures::future::join_all(listeners.into_iter().map(|(l, port)| {
        let default = proxy::fixed(default.clone(), port);
        proxy::serve(l, routes.clone(), port, default, None)
    }));
    let cluster = restore::KubeCluster {
        services,
        configmaps: configmaps.clone(),
        service: args.service.clone(),
    };
    let grace = Duration::from_secs(args.idle_grace);
    tracing::info!(service = %args.service, namespace = %args.namespace, ?ports, default = %default, idle_grace = ?grace, "mesh ready");
    tokio::select! {
        _ = proxies => Ok(()),
        () = shadow::serve_health(health) => Ok(()),
        r = watch_routes(configmaps, &args.service, &routes, &known) => r,
        () = restore::when_idle_restore(known_rx, grace, &cluster, &args.service) => Ok(()),
        () = terminated() => {
            restore::on_terminate(&cluster, &args.service).await;
            Ok(())
        }
    }
}

/// Retries of the route watch: 250 ms doubling to 3 s, from the start again after a success.
/// kube-rs's default grows to 30 s, so after an API server outage a developer's new route
/// could wait half a minute for the router to see it.
#[derive(Default)]
pub(crate) struct WatchBackoff(u32);

impl Iterator for WatchBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        self.0 = (self.0 + 1).min(5);
        Some(Duration::from_millis(250 << (self.0 - 1)).min(Duration::from_secs(3)))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.0 = 0;
    }
}

/// Returns on SIGTERM (the pod is being deleted).
pub(crate) async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGTERM");
            std::future::pending::<()>().await;
        }
    }
}

/// Keeps `routes` in step with the route ConfigMaps of `service`, and `known` with their number
/// once they have been listed. Returns only if the watch ends.
async fn watch_routes(
    api: Api<ConfigMap>,
    service: &str,
    routes: &Routes,
    known: &watch::Sender<Option<usize>>,
) -> Result<()> {
    let selector = format!("{LABEL_MESH_OF}={service}");
    let events =
        watcher(api, watcher::Config::default().labels(&selector)).backoff(WatchBackoff::default());
    futures::pin_mut!(events);
    let mut book = RouteBook::default();
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                if book.apply(event) {
                    routes.set(book.routes());
                }
                if book.synced() {
                    let n = Some(book.count());
                    known.send_if_modified(|k| std::mem::replace(k, n) != n);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, selector, "watching the route ConfigMaps failed; retrying")
            }
        }
    }
    anyhow::bail!("the watch of the route ConfigMaps ({selector}) ended")
}
