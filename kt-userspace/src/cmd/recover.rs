//! `ktctl recover <svc>`: undoes a leftover exchange or mesh of a Service from what ktctl wrote
//! on the objects (the original selector, the original replicas, the sessions that hold the
//! Service), and removes those sessions' objects. A session that still holds the Service and
//! is alive is never touched: the command names it and changes nothing.

use k8s_openapi::api::core::v1::Service;
use kube::Api;

use super::inbound::Target;
use crate::cli::{Global, RecoverArgs};
use crate::cluster::ClusterError;
use crate::cluster::leftovers::{self, Survey};
use crate::error::{EnvError, Error, Result};

pub async fn run(global: &Global, args: &RecoverArgs) -> Result<u8> {
    let name = match Target::parse(&args.target)? {
        Target::Service(n) => n,
        other => {
            return Err(EnvError::new(format!(
                "recover takes a Service (<svc> or service/<svc>), not a {}: exchange and mesh record their changes on the Service they redirect",
                other.kind()
            ))
            .into());
        }
    };
    let kube = super::connect_kube(global).await?;
    kube.require_from(
        leftovers::PERMISSIONS,
        "deploy/rbac-connect.yaml with deploy/rbac-inbound.yaml",
    )
    .await?;
    let survey = Survey::take(&kube).await?;
    // A session is alive while its shadow would still wait for it (renewed within its grace).
    let steps = survey
        .recover(&name, |a| a.alive_within(a.grace_secs))
        .map_err(|alive| Error::Runtime(format!("cannot recover service '{name}': {alive}")))?;
    if steps.is_empty() {
        let exists = Api::<Service>::namespaced(kube.client.clone(), &kube.namespace)
            .get_opt(&name)
            .await
            .map_err(|e| ClusterError::api(format!("reading service {name}"), e))?
            .is_some();
        if !exists {
            return Err(EnvError::new(format!(
                "service '{name}' not found in namespace {}",
                kube.namespace
            ))
            .into());
        }
        tracing::info!("Service '{name}' carries no change of ktctl: nothing to recover");
        return Ok(0);
    }
    super::clean::apply_all(&kube, &steps).await
}
