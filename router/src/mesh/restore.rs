//! Ending the mesh: once no developer has had a route for the idle grace period, the router
//! gives the Service back its original selector, recorded on the Service by ktctl, and exits.
//!
//! Only the router does this, and from the Service alone: the developers' laptops may all be
//! gone. A failure to restore (the API server away, a damaged record) is logged and tried
//! again later; the router keeps routing meanwhile, so the Service keeps working.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kt_common::changes::{self, ModifyError, UndoError};
use kube::Api;
use kube::api::ListParams;
use tokio::sync::watch;
use tokio::time::Instant;

use super::LABEL_MESH_OF;
use super::routes::Route;

/// Longest wait for the API calls of one restore.
const API_TIMEOUT: Duration = Duration::from_secs(30);
/// After a failed restore, the next try.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// Why the Service could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// ktctl's record on the Service is damaged (see kt-common's `changes`).
    #[error(transparent)]
    Undo(#[from] UndoError),
    #[error("service {service}: {error}")]
    Api { service: String, error: kube::Error },
    #[error("the API server did not answer in {API_TIMEOUT:?}")]
    Timeout,
}

/// Decides when the mesh has had no route for the grace period, on this pod's monotonic clock.
#[derive(Debug)]
pub struct IdleClock {
    grace: Duration,
    empty_since: Option<Instant>,
}

impl IdleClock {
    /// A clock that counts from `now` as if there were no route: a router nobody ever uses
    /// ends too.
    pub fn new(grace: Duration, now: Instant) -> IdleClock {
        IdleClock {
            grace,
            empty_since: Some(now),
        }
    }

    /// Takes the number of routes seen at `now`.
    pub fn observe(&mut self, now: Instant, routes: usize) {
        if routes > 0 {
            self.empty_since = None;
        } else {
            self.empty_since.get_or_insert(now);
        }
    }

    /// When the mesh ends if nothing changes.
    pub fn deadline(&self) -> Option<Instant> {
        self.empty_since.map(|t| t + self.grace)
    }
}

/// What a restore found.
#[derive(Debug, PartialEq, Eq)]
pub enum Restored {
    /// The selector is back.
    Done,
    /// The Service is not meshed (someone restored it already).
    NotMeshed,
    /// The Service does not exist.
    Gone,
}

/// Gives the Service its original selector back, from ktctl's record on it, if the mesh
/// router holds it; with the resourceVersion read, retrying when another writer got in between.
pub async fn restore(api: &Api<Service>, name: &str) -> Result<Restored, RestoreError> {
    let mut undone = false;
    let r = changes::modify(api, name, |s: &mut Service| {
        undone = changes::undo_selector(s, Some(changes::BY_MESH_ROUTER))?;
        Ok::<_, UndoError>(undone)
    })
    .await;
    match r {
        Ok(None) => Ok(Restored::Gone),
        Ok(Some(_)) if undone => Ok(Restored::Done),
        Ok(Some(_)) => Ok(Restored::NotMeshed),
        Err(ModifyError::Refused(e)) => Err(e.into()),
        Err(ModifyError::Api(error)) => Err(RestoreError::Api {
            service: name.to_string(),
            error,
        }),
    }
}

/// The API calls that end the mesh: the seam tests fake.
pub trait Cluster {
    /// The number of valid routes, listed now.
    fn live_routes(&self) -> impl Future<Output = Result<usize, RestoreError>>;
    /// Restores the Service ([`restore`]).
    fn restore(&self) -> impl Future<Output = Result<Restored, RestoreError>>;
}

/// The meshed Service and its routes in the API server.
pub struct KubeCluster {
    pub services: Api<Service>,
    pub configmaps: Api<ConfigMap>,
    pub service: String,
}

impl Cluster for KubeCluster {
    async fn live_routes(&self) -> Result<usize, RestoreError> {
        let selector = format!("{LABEL_MESH_OF}={}", self.service);
        let list = self
            .configmaps
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|error| RestoreError::Api {
                service: self.service.clone(),
                error,
            })?;
        Ok(list
            .items
            .iter()
            .filter(|cm| Route::from_configmap(cm).is_ok())
            .count())
    }

    async fn restore(&self) -> Result<Restored, RestoreError> {
        restore(&self.services, &self.service).await
    }
}

/// Returns once the mesh has had no route for `grace` and the Service is restored (or found
/// not meshed, or gone).
///
/// `routes` carries the number of routes, `None` until the watch has listed them once: the
/// clock runs from the start, but the Service is restored only on a known empty table, never
/// because the API server was unreachable. Before restoring, the routes are listed afresh, in
/// case the watch lags behind a developer who just arrived.
pub async fn when_idle_restore(
    mut routes: watch::Receiver<Option<usize>>,
    grace: Duration,
    cluster: &impl Cluster,
    service: &str,
) {
    let mut clock = IdleClock::new(grace, Instant::now());
    loop {
        let known = *routes.borrow_and_update();
        if let Some(n) = known {
            clock.observe(Instant::now(), n);
        }
        let deadline = known.and(clock.deadline());
        tokio::select! {
            () = sleep_until(deadline) => {}
            changed = routes.changed() => {
                if changed.is_err() {
                    // The watch is gone; the router is ending anyway.
                    return std::future::pending().await;
                }
                continue;
            }
        }
        let attempt = tokio::time::timeout(API_TIMEOUT, async {
            let n = cluster.live_routes().await?;
            if n > 0 {
                return Ok(Err(n));
            }
            cluster.restore().await.map(Ok)
        })
        .await
        .unwrap_or(Err(RestoreError::Timeout));
        match attempt {
            Ok(Ok(Restored::Done)) => {
                tracing::info!(service, "restored the selector of service {service}");
                return;
            }
            Ok(Ok(Restored::NotMeshed)) => {
                tracing::info!(
                    service,
                    "no route left and service {service} is not meshed; nothing to restore"
                );
                return;
            }
            Ok(Ok(Restored::Gone)) => {
                tracing::info!(service, "no route left and service {service} is gone");
                return;
            }
            Ok(Err(n)) => {
                tracing::info!(
                    routes = n,
                    "a route appeared as the mesh was ending; it goes on"
                );
                clock.observe(Instant::now(), n);
            }
            Err(e) => {
                match e {
                    RestoreError::Undo(_) => {
                        tracing::error!(error = %e, retry_in = ?RETRY_AFTER, "cannot restore the service; still routing")
                    }
                    _ => {
                        tracing::warn!(error = %e, retry_in = ?RETRY_AFTER, "cannot restore the service; still routing")
                    }
                }
                tokio::time::sleep(RETRY_AFTER).await;
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// How long, once asked to stop, the router waits for the last routes to go before it gives up
/// restoring (the pod's termination grace period is longer).
pub const TERMINATING_WAIT: Duration = Duration::from_secs(7);

/// The router is being stopped (its last owner, a meshing session, ended and garbage
/// collection deletes it): if no route is left, or none is left within [`TERMINATING_WAIT`]
/// (the collector removes the session's route at about the same time), the Service is
/// restored now, as the idle clock would not get the chance. With routes of live sessions left,
/// nothing is touched: they own the router too, so this is someone deleting it by hand.
pub async fn on_terminate(cluster: &impl Cluster, service: &str) {
    let deadline = Instant::now() + TERMINATING_WAIT;
    loop {
        match tokio::time::timeout(API_TIMEOUT, cluster.live_routes()).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) if Instant::now() >= deadline => {
                tracing::warn!(
                    service,
                    routes = n,
                    "stopping with routes left; the Service stays meshed"
                );
                return;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(service, error = %e, "cannot list the routes while stopping")
            }
            Err(_) => tracing::warn!(service, "listing the routes timed out while stopping"),
        }
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    match tokio::time::timeout(API_TIMEOUT, cluster.restore()).await {
        Ok(Ok(Restored::Done)) => tracing::info!(
            service,
            "restored the selector of service {service} (stopping, no route left)"
        ),
        Ok(Ok(_)) => tracing::info!(service, "stopping; nothing to restore"),
        Ok(Err(e)) => {
            tracing::error!(service, error = %e, "cannot restore the Service while stopping")
        }
        Err(_) => tracing::error!(service, "restoring the Service timed out while stopping"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cluster whose listing finds `live` routes (one value per call, the last repeated),
    /// recording the calls.
    struct Fake {
        live: std::cell::RefCell<Vec<usize>>,
        calls: std::cell::RefCell<Vec<&'static str>>,
    }

    impl Fake {
        fn new(live: &[usize]) -> Fake {
            Fake {
                live: std::cell::RefCell::new(live.to_vec()),
                calls: Default::default(),
            }
        }
        fn calls(&self) -> Vec<&'static str> {
            self.calls.borrow().clone()
        }
    }

    impl Cluster for Fake {
        async fn live_routes(&self) -> Result<usize, RestoreError> {
            self.calls.borrow_mut().push("list");
            let mut live = self.live.borrow_mut();
            Ok(if live.len() > 1 {
                live.remove(0)
            } else {
                live[0]
            })
        }
        async fn restore(&self) -> Result<Restored, RestoreError> {
            self.calls.borrow_mut().push("restore");
            Ok(Restored::Done)
        }
    }

    /// Lets `fut` run for `d` of (paused) time; whether it finished.
    async fn runs_out(fut: &mut std::pin::Pin<&mut impl Future<Output = ()>>, d: Duration) -> bool {
        tokio::select! {
            () = fut.as_mut() => true,
            () = tokio::time::sleep(d) => false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_service_is_restored_only_once_the_routes_are_known_to_be_empty_for_the_grace() {
        let grace = Duration::from_secs(15);
        let (tx, rx) = watch::channel(None);
        let fake = Fake::new(&[0]);
        let fut = when_idle_restore(rx, grace, &fake, "nginx");
        tokio::pin!(fut);
        assert!(
            !runs_out(&mut fut, grace * 4).await,
            "routes not known yet (API server away): no restore"
        );
        assert!(fake.calls().is_empty());
        tx.send_replace(Some(1));
        assert!(!runs_out(&mut fut, grace * 4).await, "a developer is there");
        tx.send_replace(Some(0));
        assert!(!runs_out(&mut fut, grace - Duration::from_secs(1)).await);
        tx.send_replace(Some(0));
        assert!(
            !runs_out(&mut fut, Duration::from_millis(900)).await,
            "an unrelated event does not reset the clock"
        );
        assert!(
            runs_out(&mut fut, Duration::from_millis(200)).await,
            "restored after the grace"
        );
        assert_eq!(fake.calls(), ["list", "restore"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_router_nobody_uses_ends_a_grace_after_its_start() {
        let grace = Duration::from_secs(15);
        let (tx, rx) = watch::channel(None);
        let fake = Fake::new(&[0]);
        let fut = when_idle_restore(rx, grace, &fake, "nginx");
        tokio::pin!(fut);
        assert!(!runs_out(&mut fut, Duration::from_secs(10)).await);
        tx.send_replace(Some(0));
        assert!(!runs_out(&mut fut, Duration::from_secs(4)).await);
        assert!(
            runs_out(&mut fut, Duration::from_secs(2)).await,
            "15 s from the start"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_route_the_watch_has_not_seen_yet_keeps_the_mesh() {
        let grace = Duration::from_secs(15);
        let (_tx, rx) = watch::channel(Some(0));
        let fake = Fake::new(&[1, 0]);
        let fut = when_idle_restore(rx, grace, &fake, "nginx");
        tokio::pin!(fut);
        assert!(!runs_out(&mut fut, grace + Duration::from_secs(1)).await);
        assert_eq!(fake.calls(), ["list"], "listed, found a route, kept going");
        assert!(runs_out(&mut fut, grace).await);
        assert_eq!(fake.calls(), ["list", "list", "restore"]);
    }

    #[test]
    fn the_idle_clock_runs_from_the_start_and_from_the_last_route_leaving() {
        let grace = Duration::from_secs(15);
        let t0 = Instant::now();
        let mut c = IdleClock::new(grace, t0);
        assert_eq!(c.deadline(), Some(t0 + grace), "counting from the start");
        c.observe(t0 + Duration::from_secs(5), 0);
        assert_eq!(c.deadline(), Some(t0 + grace), "still empty: not reset");
        c.observe(t0 + Duration::from_secs(10), 2);
        assert_eq!(c.deadline(), None, "routed");
        c.observe(t0 + Duration::from_secs(20), 1);
        assert_eq!(c.deadline(), None);
        c.observe(t0 + Duration::from_secs(30), 0);
        assert_eq!(c.deadline(), Some(t0 + Duration::from_secs(30) + grace));
    }

    #[tokio::test(start_paused = true)]
    /// Regression: garbage collection deleted the router of the last meshing session before
    /// its idle clock ran out, leaving the Service selecting a pod that no longer existed.
    async fn a_stopping_router_restores_once_the_last_route_is_gone_and_not_while_routes_live() {
        let fake = Fake::new(&[1, 1, 0]);
        on_terminate(&fake, "nginx").await;
        assert_eq!(fake.calls(), vec!["list", "list", "list", "restore"]);
        let busy = Fake::new(&[2]);
        on_terminate(&busy, "nginx").await;
        assert!(!busy.calls().contains(&"restore"), "{:?}", busy.calls());
    }
}
