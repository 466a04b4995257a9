//! `ktctl exchange`: all traffic of a cluster Service (or of a workload's Service) comes to
//! local ports instead.
//!
//! - selector mode (default): a shadow listening on the exposed ports takes the Service's
//!   selector; the original is written on the Service first and put back on exit. If someone
//!   reverts the selector meanwhile, ktctl takes it again and says so.
//! - scale mode: a shadow carrying the workload's pod labels takes its place and the workload
//!   is scaled to 0; on exit its replicas come back and ktctl waits for them to be ready.
//! - ebpf mode: the shadow is labelled `kt.dev/steer-service=<svc>` and the router DaemonSet
//!   (`kt-router node`) on every node sends the Service's ClusterIP and its pods' addresses to
//!   it, for callers on any node, by pod IP too; nothing in the Service or the workload
//!   changes. When the shadow goes (exit, or ktctl gone for `--grace`), steering stops.
//!
//! Everything that can be wrong with the input (the target, its ports, a closed local port,
//! another session holding the Service) is found before the cluster is touched. If ktctl dies,
//! its shadow restores the Service (or the replicas) once ktctl has been gone for `--grace`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kt_common::changes::{self, ModifyError};
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};

use super::Signals;
use super::inbound::{self, LockMode, Target};
use crate::cli::{ExchangeArgs, ExchangeMode, Global};
use crate::cluster::session::{ROLE_LABEL, SESSION_LABEL, Session};
use crate::cluster::{CONNECT_PERMISSIONS, ClusterError, Kube, router};
use crate::error::{EnvError, Error, Result};
use crate::interrupt::Interrupts;
use crate::progress::Progress;
use crate::tunnel::Tunnel;

const ROLE: &str = "shadow-exchange";

/// Runs the command; the exit code.
pub async fn run(global: &Global, args: &ExchangeArgs) -> Result<u8> {
    if args.mode == ExchangeMode::Ephemeral {
        return Err(EnvError::new(
            "--mode ephemeral is not offered: it needs an ephemeral container with NET_ADMIN in each of the workload's pods, which a restricted namespace forbids; --mode selector (the default) or scale sends the same traffic here",
        )
        .into());
    }
    let target = Target::parse(&args.target)?;
    let expose = &args.expose.expose;
    let kube = super::connect_kube(global).await?;
    kube.require(CONNECT_PERMISSIONS).await?;
    kube.require_from(inbound::INBOUND_PERMISSIONS, "deploy/rbac-inbound.yaml")
        .await?;

    let svc = inbound::service_of(&kube, &target).await?;
    let svc_name = svc.metadata.name.clone().unwrap_or_default();
    inbound::selector_of(&svc)?;
    inbound::check_remote_ports(&svc, expose)?;
    let deployment = match args.mode {
        ExchangeMode::Selector => None,
        ExchangeMode::Ebpf => {
            router::require(&kube, "exchange --mode ebpf").await?;
            None
        }
        ExchangeMode::Scale => Some(deployment_of(&kube, &target, &svc).await?),
        ExchangeMode::Ephemeral => unreachable!("refused above"),
    };
    inbound::check_local_ports(expose, args.expose.skip_port_checking).await?;
    inbound::clean_dead(&kube, args.session.skip_cleanup).await?;
    inbound::check_lock(&kube, &svc_name, LockMode::Exclusive).await?;

    let mut opts = super::shadow_options(global)?;
    opts.ports = inbound::remote_ports(expose);
    opts.name = Some(format!("{svc_name}-kt-exchange-{{id}}"));
    match &deployment {
        None if args.mode == ExchangeMode::Ebpf => {
            opts.labels = BTreeMap::from([(changes::STEER_LABEL.to_string(), svc_name.clone())]);
        }
        None => opts.restore = vec![format!("service/{svc_name}")],
        Some(d) => {
            opts.restore = vec![format!(
                "deployment/{}",
                d.metadata.name.clone().unwrap_or_default()
            )];
            opts.labels = d
                .spec
                .template
                .metadata
                .as_ref()
                .and_then(|m| m.labels.clone())
                .unwrap_or_default();
        }
    }
    let interrupts =
        Interrupts::install("exchange").map_err(|e| Error::io("handling signals", e))?;
    let mark = interrupts.count();
    let what = format!("{} '{}'", target.kind(), target.name());
    super::with_shadow(
        &kube,
        &opts,
        "exchange",
        Duration::from_secs(args.session.grace),
        Duration::from_secs(global.port_forward_timeout),
        &interrupts,
        Signals::Body,
        async |session, tunnel| {
            inbound::take_lock(session, &kube, &svc_name, LockMode::Exclusive).await?;
            inbound::expose_all(tunnel, expose).await?;
            let ended = match &deployment {
                None if args.mode == ExchangeMode::Ebpf => {
                    by_steering(&svc_name, &what, &interrupts, mark).await
                }
                None => by_selector(&kube, session, &svc_name, &what, &interrupts, mark).await,
                Some(d) => {
                    by_scale(
                        &kube,
                        session,
                        tunnel,
                        d,
                        args.recover_wait_time,
                        &what,
                        &interrupts,
                        mark,
                    )
                    .await
                }
            };
            inbound::ended(ended)
        },
    )
    .await
}

/// The selector that picks this session's shadow (also after it is replaced).
fn shadow_selector(session: &Session) -> BTreeMap<String, String> {
    BTreeMap::from([
        (SESSION_LABEL.to_string(), session.id.clone()),
        (ROLE_LABEL.to_string(), ROLE.to_string()),
    ])
}

fn modify_error(what: &str, e: ModifyError<changes::Holder>) -> Error {
    match e {
        ModifyError::Refused(h) => Error::Runtime(format!("{what} is already taken by {h}")),
        ModifyError::Api(e) => ClusterError::api(format!("updating {what}"), e).into(),
    }
}

/// The routers steer the Service to the shadow while it is ready (it is, by now); waits for a
/// signal. Leaving needs no undo: the shadow's end stops the steering.
async fn by_steering(svc: &str, what: &str, interrupts: &Interrupts, mark: u64) -> Error {
    tracing::info!(
        "The kt-router on every node now steers service '{svc}' to the shadow; the Service and its workload are unchanged"
    );
    inbound::banner(&format!(
        "Now all request to {what} will be redirected to local"
    ));
    inbound::until_interrupted(interrupts, mark).await
}

/// Takes the Service's selector, keeps it until a signal (or an error), then restores it;
/// returns why it ended.
async fn by_selector(
    kube: &Kube,
    session: &Session,
    svc: &str,
    what: &str,
    interrupts: &Interrupts,
    mark: u64,
) -> Error {
    let api = Api::<Service>::namespaced(kube.client.clone(), &kube.namespace);
    let ours = shadow_selector(session);
    let holder = session.holder();
    let take = |s: &mut Service| {
        changes::take_selector(s, &holder, ours.clone())?;
        Ok(true)
    };
    match changes::modify(&api, svc, take).await {
        Ok(Some(_)) => {}
        Ok(None) => return EnvError::new(format!("service '{svc}' was deleted")).into(),
        Err(e) => return modify_error(&format!("service '{svc}'"), e),
    }
    tracing::info!(
        "Service '{svc}' now selects shadow pod(s) {}",
        fmt_selector(&ours)
    );
    crate::pidfile::update(|r| r.changed.push(format!("selector of service/{svc}")));
    inbound::banner(&format!(
        "Now all request to {what} will be redirected to local"
    ));
    let ended = tokio::select! {
        e = inbound::until_interrupted(interrupts, mark) => e,
        e = keep_selector(&api, svc, &ours, &holder) => e,
    };
    let undo = changes::modify(&api, svc, |s: &mut Service| {
        changes::undo_selector(s, Some(&session.id))
    })
    .await;
    match undo {
        Ok(_) => tracing::info!("Restored the selector of service '{svc}'"),
        Err(e) => tracing::error!(
            "cannot restore the selector of service '{svc}': {e}; the shadow restores it once this session ends, or run `ktctl recover {svc}`"
        ),
    }
    ended
}

fn fmt_selector(sel: &BTreeMap<String, String>) -> String {
    sel.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Watches the Service and puts the shadow's selector back whenever someone changes it; returns
/// only on an error (the Service deleted, or another session took it).
async fn keep_selector(
    api: &Api<Service>,
    svc: &str,
    ours: &BTreeMap<String, String>,
    holder: &changes::Holder,
) -> Error {
    let config = watcher::Config::default().fields(&format!("metadata.name={svc}"));
    let mut events = std::pin::pin!(watcher(api.clone(), config).default_backoff());
    let mut failing = false;
    while let Some(ev) = events.next().await {
        let obj = match ev {
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => o,
            Ok(watcher::Event::Delete(_)) => {
                return Error::Runtime(format!("service '{svc}' was deleted while exchanged"));
            }
            Ok(_) => continue,
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "watching service '{svc}' failed; retrying");
                }
                failing = true;
                continue;
            }
        };
        failing = false;
        let selector = obj.spec.as_ref().and_then(|s| s.selector.as_ref());
        if selector == Some(ours) {
            continue;
        }
        tracing::warn!(
            "The selector of service '{svc}' was changed to {} while exchanged; putting the shadow's back",
            selector.map(fmt_selector).unwrap_or_default()
        );
        let retake = changes::modify(api, svc, |s: &mut Service| {
            let current = s.spec.as_ref().and_then(|s| s.selector.as_ref());
            if current == Some(ours) {
                return Ok(false);
            }
            // What they set is the new original, restored on exit.
            if let Some(a) = s.metadata.annotations.as_mut() {
                a.remove(changes::ORIGINAL_SELECTOR);
            }
            changes::take_selector(s, holder, ours.clone())?;
            Ok(true)
        })
        .await;
        match retake {
            Ok(_) => tracing::info!("Service '{svc}' selects the shadow again"),
            Err(e) => return modify_error(&format!("service '{svc}'"), e),
        }
    }
    Error::Runtime(format!("the watch of service '{svc}' ended"))
}

/// The Deployment behind a target, for scale mode; one with no replicas has no traffic of its
/// own to take over.
async fn deployment_of(kube: &Kube, target: &Target, svc: &Service) -> Result<Deployment> {
    let d = find_deployment(kube, target, svc).await?;
    if d.spec.replicas == Some(0) {
        return Err(EnvError::new(format!(
            "--mode scale: deployment '{}' has 0 replicas, so there is nothing to scale down; scale it up or use --mode selector",
            d.metadata.name.clone().unwrap_or_default()
        ))
        .into());
    }
    Ok(d)
}

async fn find_deployment(kube: &Kube, target: &Target, svc: &Service) -> Result<Deployment> {
    let api = Api::<Deployment>::namespaced(kube.client.clone(), &kube.namespace);
    if let Target::Deployment(n) = target {
        return api
            .get_opt(n)
            .await
            .map_err(|e| ClusterError::api(format!("reading deployment {n}"), e))?
            .ok_or_else(|| {
                EnvError::new(format!(
                    "deployment '{n}' not found in namespace {}",
                    kube.namespace
                ))
                .into()
            });
    }
    let selector = inbound::selector_of(svc)?;
    let list = api
        .list(&Default::default())
        .await
        .map_err(|e| ClusterError::api("listing deployments", e))?;
    let mut matching: Vec<Deployment> = list
        .items
        .into_iter()
        .filter(|d| {
            let labels = d
                .spec
                .template
                .metadata
                .as_ref()
                .and_then(|m| m.labels.as_ref());
            labels.is_some_and(|l| selector.iter().all(|(k, v)| l.get(k) == Some(v)))
        })
        .collect();
    let name = svc.metadata.name.clone().unwrap_or_default();
    match matching.len() {
        1 => Ok(matching.remove(0)),
        0 => Err(EnvError::new(format!(
            "--mode scale: no Deployment in namespace {} runs the pods of service '{name}'; use --mode selector",
            kube.namespace
        ))
        .into()),
        _ => Err(EnvError::new(format!(
            "--mode scale: several Deployments run the pods of service '{name}'; name one as deployment/<name>"
        ))
        .into()),
    }
}

/// Scales the Deployment to 0 (the shadow carries its labels), until a signal; then brings its
/// replicas back and waits for them.
#[expect(
    clippy::too_many_arguments,
    reason = "the command's state, passed once"
)]
async fn by_scale(
    kube: &Kube,
    session: &Session,
    _tunnel: &Tunnel,
    d: &Deployment,
    wait: u64,
    what: &str,
    interrupts: &Interrupts,
    mark: u64,
) -> Error {
    let name = d.metadata.name.clone().unwrap_or_default();
    let api = Api::<Deployment>::namespaced(kube.client.clone(), &kube.namespace);
    let holder = session.holder();
    let mut original = 0;
    let scaled = changes::modify(&api, &name, |d: &mut Deployment| {
        original = changes::take_replicas(d, &holder)?;
        Ok(true)
    })
    .await;
    match scaled {
        Ok(Some(_)) => {}
        Ok(None) => return EnvError::new(format!("deployment '{name}' was deleted")).into(),
        Err(e) => return modify_error(&format!("deployment '{name}'"), e),
    }
    tracing::info!("Deployment '{name}' scaled from {original} to 0 replicas");
    crate::pidfile::update(|r| {
        r.changed
            .push(format!("replicas of deployment/{name} ({original} to 0)"))
    });
    inbound::banner(&format!(
        "Now all request to {what} will be redirected to local"
    ));
    let ended = inbound::until_interrupted(interrupts, mark).await;
    let undo = changes::modify(&api, &name, |d: &mut Deployment| {
        Ok::<_, changes::Holder>(changes::undo_replicas(d, Some(&session.id)).is_some())
    })
    .await;
    match undo {
        Ok(_) => {
            tracing::info!("Restored deployment '{name}' to {original} replicas");
            wait_ready(&api, &name, original, Duration::from_secs(wait)).await;
        }
        Err(e) => tracing::error!(
            "cannot restore the replicas of deployment '{name}': {}; the shadow restores them once this session ends",
            modify_error(&name, e)
        ),
    }
    ended
}

/// Waits (with progress) until the Deployment has `want` ready replicas, or `timeout`.
async fn wait_ready(api: &Api<Deployment>, name: &str, want: i32, timeout: Duration) {
    if timeout.is_zero() || want == 0 {
        return;
    }
    let started = Instant::now();
    let mut progress = Progress::new(format!("Waiting for deployment '{name}' to be ready again"));
    loop {
        let ready = api
            .get_opt(name)
            .await
            .ok()
            .flatten()
            .and_then(|d| d.status)
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0);
        if ready >= want {
            progress.finish();
            tracing::info!("Deployment '{name}' has {ready}/{want} ready replicas");
            return;
        }
        if started.elapsed() >= timeout {
            progress.finish();
            tracing::warn!(
                "Deployment '{name}' has {ready}/{want} ready replicas after --recoverWaitTime {}s; not waiting longer",
                timeout.as_secs()
            );
            return;
        }
        progress.set(format!(
            "Waiting for deployment '{name}' to be ready again ({ready}/{want})"
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
