//! One module per command, and what they share: a session with a shadow and its tunnel.

pub mod birdseye;
pub mod clean;
pub mod config;
pub mod connect;
pub mod diagnose;
pub mod exchange;
pub mod forward;
pub mod inbound;
pub mod mesh;
pub mod preview;
pub mod recover;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kt_common::pki::SessionPki;
use kt_common::tunnel::ServerPin;
use kube::Api;

use crate::cli::Global;
use crate::cluster::Kube;
use crate::cluster::session::Session;
use crate::cluster::shadow::{self, ShadowOptions};
use crate::error::EnvError;
use crate::error::{Error, Result};
use crate::interrupt::{self, Interrupts};
use crate::tunnel::{KubeShadow, Tunnel};

/// Aborts a task when dropped.
pub(crate) struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Who handles signals while the body of [`with_shadow`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Signals {
    /// A signal ends the body; the session is cleaned up.
    EndBody,
    /// The body waits for signals itself (through the [`Interrupts`] it is given).
    Body,
}

/// Starts a session, deploys its shadow, brings the tunnel up and runs `body`; then closes the
/// tunnel and removes every object of the session, whatever `body` returned, and also when a
/// signal comes at any moment of this (before `body`, or during it with [`Signals::EndBody`]).
/// A second signal during a cleanup that hangs (say, on an unreachable API server) ends it at
/// once, saying what may be left. An error is reported before the cleanup lines and comes
/// back as [`Error::Reported`].
#[expect(
    clippy::too_many_arguments,
    reason = "the shared frame of every command that runs a shadow"
)]
pub(crate) async fn with_shadow<T>(
    kube: &Kube,
    opts: &ShadowOptions,
    command: &str,
    grace: Duration,
    pf_timeout: Duration,
    interrupts: &Interrupts,
    signals: Signals,
    body: impl AsyncFnOnce(&Session, &Tunnel) -> Result<T>,
) -> Result<T> {
    let mark = interrupts.count();
    let session = tokio::select! {
        s = Session::begin(kube, command, grace) => Arc::new(s?),
        sig = interrupts.after(mark) => {
            tracing::info!("{}", interrupt::describe(sig));
            return Err(Error::Reported(1));
        }
    };
    tracing::debug!(session = %session.id, "session started");
    let lost = tokio_util::sync::CancellationToken::new();
    let _renewer = AbortOnDrop(session.spawn_renewer(lost.clone()));
    let mut tunnel_slot: Option<Tunnel> = None;
    let result = {
        let setup = async {
            let pki =
                SessionPki::generate(&session.id, 30).map_err(|e| Error::Runtime(e.to_string()))?;
            let role = format!("shadow-{command}");
            tracing::info!(
                "Deploying shadow pod {} in namespace {} (session {})",
                shadow::pod_name(&session, opts, 0),
                session.namespace,
                session.id
            );
            shadow::deploy_identity(&session, &role, &opts.restore).await?;
            let pod =
                shadow::deploy_pod(&session, kube, &role, opts, &pki.client_ca_pem, 0).await?;
            tracing::info!(
                "Shadow pod {} is ready ({})",
                pod.metadata.name.clone().unwrap_or_default(),
                pod.status
                    .as_ref()
                    .and_then(|s| s.pod_ip.clone())
                    .unwrap_or_default()
            );
            let pin = ServerPin::trust_first();
            let replace = {
                let (session, kube, opts, role, ca) = (
                    session.clone(),
                    kube.clone(),
                    opts.clone(),
                    role.clone(),
                    pki.client_ca_pem.clone(),
                );
                Box::new(move |n: u32| {
                    let (session, kube, opts, role, ca) = (
                        session.clone(),
                        kube.clone(),
                        opts.clone(),
                        role.clone(),
                        ca.clone(),
                    );
                    Box::pin(async move {
                        Ok(shadow::deploy_pod(&session, &kube, &role, &opts, &ca, n).await?)
                    }) as futures::future::BoxFuture<'static, Result<Pod>>
                })
            };
            let link = KubeShadow::new(
                Api::<Pod>::namespaced(kube.client.clone(), &kube.namespace),
                &pod,
                shadow::TUNNEL_PORT,
                kt_common::tunnel::client_tls(&pki.client, &pin)?,
                pin,
                session.id.clone(),
                replace,
            );
            Tunnel::start(Arc::new(link), pf_timeout).await
        };
        let setup = tokio::select! {
            t = setup => t,
            sig = interrupts.after(mark) => Err(interrupted(sig)),
        };
        match setup {
            Err(e) => Err(e),
            Ok(tunnel) => {
                tunnel_slot = Some(tunnel.clone());
                let ended = async {
                    tokio::select! {
                        () = lost.cancelled() => Error::Runtime(
                            "the session ended in the cluster (its lease was deleted): ktctl was unreachable for longer than --grace, or the session was cleaned up".into(),
                        ),
                        sig = interrupts.after(mark), if signals == Signals::EndBody => interrupted(sig),
                    }
                };
                tokio::select! {
                    r = body(&session, &tunnel) => r,
                    e = ended => Err(e),
                }
            }
        }
    };
    // Before the objects go, so that the shadow's deletion is not taken for a dropped tunnel.
    if let Some(t) = tunnel_slot {
        t.close();
    }
    match &result {
        Err(Error::Interrupted(sig)) => tracing::info!("{}", interrupt::describe(*sig)),
        Err(e) => tracing::error!("{e}"),
        Ok(_) => {}
    }
    tracing::info!("Cleaning up session {}", session.id);
    let cleanup_mark = interrupts.count();
    tokio::select! {
        removed = session.end() => {
            for obj in removed {
                tracing::info!("Deleted {obj}");
            }
        }
        sig = interrupts.after(cleanup_mark) => {
            tracing::error!(
                "{} again: exiting before the cleanup finished. These may be left in namespace {}: {}. \
                 The session's shadow removes them once ktctl has been gone for --grace ({}s); if it cannot, `ktctl clean` removes them later.",
                interrupt::describe(sig),
                session.namespace,
                session.created().join(", "),
                grace.as_secs(),
            );
            return Err(Error::Reported(1));
        }
    }
    result.map_err(|e| match e {
        Error::Reported(c) => Error::Reported(c),
        e => Error::Reported(e.exit_code()),
    })
}

/// Connects to the cluster the global flags name and says which and who is running.
pub(crate) async fn connect_kube(global: &Global) -> Result<Kube> {
    let kube = Kube::connect(&crate::cluster::Target {
        kubeconfig: global.kubeconfig.clone(),
        context: global.context.clone(),
        namespace: global.namespace.clone(),
    })
    .await?;
    crate::pidfile::update(|r| {
        r.context = kube.context.clone();
        r.namespace = kube.namespace.clone();
    });
    tracing::info!(
        "Using cluster context {} ({}), namespace {}",
        kube.context,
        kube.server,
        kube.namespace
    );
    tracing::info!(
        "KtConnect (ktctl) {} start at {} ({} {})",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        std::env::consts::OS,
        std::env::consts::ARCH
    );
    Ok(kube)
}

/// The shadow's options from the global flags (image, pull secret, node selector, quota).
pub(crate) fn shadow_options(global: &Global) -> Result<ShadowOptions> {
    let pairs = |flag: &str, v: &Option<String>| {
        v.as_deref()
            .map(|s| shadow::parse_pairs(flag, s))
            .transpose()
            .map_err(EnvError)
            .map(Option::unwrap_or_default)
    };
    compatibility_notes(global);
    Ok(ShadowOptions {
        pull_always: global.force_update,
        user_labels: pairs("--withLabel", &global.with_label)?,
        user_annotations: pairs("--withAnnotation", &global.with_annotation)?,
        image: global.image.clone(),
        image_pull_secret: global.image_pull_secret.clone(),
        node_selector: global
            .node_selector
            .as_deref()
            .map(shadow::parse_node_selector)
            .transpose()
            .map_err(EnvError)?
            .unwrap_or_default(),
        quota: global
            .pod_quota
            .as_deref()
            .map(shadow::parse_quota)
            .transpose()
            .map_err(EnvError)?
            .unwrap_or_default(),
        creation_timeout: Duration::from_secs(global.pod_creation_timeout),
        ..Default::default()
    })
}

/// kt-connect's flags that ktctl accepts but that change nothing here: one line each, saying
/// why.
fn compatibility_notes(global: &Global) {
    if let Some(sa) = &global.service_account {
        tracing::info!(
            "--serviceAccount {sa}: accepted for compatibility; the shadow runs as a ServiceAccount of its own session, which may touch only that session's objects"
        );
    }
    if global.use_shadow_deployment {
        tracing::info!(
            "--useShadowDeployment: accepted for compatibility; the shadow is a bare pod owned by the session, which ktctl replaces itself if it dies"
        );
    }
    if global.use_local_time {
        tracing::info!(
            "--useLocalTime: accepted for compatibility; ktctl reads session liveness on the API server's clock alone"
        );
    }
}

fn interrupted(sig: i32) -> Error {
    Error::Interrupted(sig)
}
