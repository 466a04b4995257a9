//! One module per command, and what they share: a session with a shadow and its tunnel.

pub mod connect;
pub mod diagnose;

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kt_common::pki::SessionPki;
use kube::Api;

use crate::cluster::Kube;
use crate::cluster::session::Session;
use crate::cluster::shadow::{self, ShadowOptions};
use crate::error::{Error, Result};
use crate::tunnel::{self, Tunnel};

/// Aborts a task when dropped.
pub(crate) struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts a session, deploys its shadow, brings the tunnel up and runs `body`; then closes the
/// tunnel and removes every object of the session, whatever `body` returned. An error is
/// reported before the cleanup lines and comes back as [`Error::Reported`].
pub(crate) async fn with_shadow<T>(
    kube: &Kube,
    opts: &ShadowOptions,
    command: &str,
    grace: Duration,
    pf_timeout: Duration,
    body: impl AsyncFnOnce(&Session, &Tunnel) -> Result<T>,
) -> Result<T> {
    let session = Session::begin(kube, command, grace).await?;
    tracing::debug!(session = %session.id, "session started");
    let result = async {
        let pki =
            SessionPki::generate(&session.id, 30).map_err(|e| Error::Runtime(e.to_string()))?;
        let lost = tokio_util::sync::CancellationToken::new();
        let _renewer = AbortOnDrop(session.spawn_renewer(lost.clone()));
        tracing::info!(
            "Deploying shadow pod kt-connect-shadow-{} in namespace {}",
            session.id,
            session.namespace
        );
        let pod = shadow::deploy(
            &session,
            kube,
            &format!("shadow-{command}"),
            opts,
            &pki.server,
        )
        .await?;
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        tracing::info!(
            "Shadow pod {pod_name} is ready ({})",
            pod.status.and_then(|s| s.pod_ip).unwrap_or_default()
        );
        let target = tunnel::Target {
            pods: Api::<Pod>::namespaced(kube.client.clone(), &kube.namespace),
            pod: pod_name,
            port: shadow::TUNNEL_PORT,
            tls: kt_common::tunnel::client_tls(&pki.client)?,
            session: session.id.clone(),
        };
        let tunnel = Tunnel::start(target, pf_timeout).await?;
        let r = tokio::select! {
            r = body(&session, &tunnel) => r,
            () = lost.cancelled() => Err(Error::Runtime(
                "the session ended in the cluster (its lease was deleted): ktctl was unreachable for longer than --grace, or the session was cleaned up".into(),
            )),
        };
        // Before the objects go, so that the shadow's deletion is not taken for a dropped tunnel.
        tunnel.close();
        r
    }
    .await;
    if let Err(e) = &result {
        tracing::error!("{e}");
    }
    tracing::info!("Cleaning up session {}", session.id);
    for obj in session.end().await {
        tracing::info!("Deleted {obj}");
    }
    result.map_err(|e| match e {
        Error::Reported(c) => Error::Reported(c),
        e => Error::Reported(e.exit_code()),
    })
}
