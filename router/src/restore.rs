//! Undoing what a session changed in users' objects, from the records on the objects
//! (`kt_common::changes`): the shadow does it when its session ends without ktctl (ktctl
//! killed, its machine gone), before the session's Lease is deleted.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kt_common::changes::{self, ModifyError};
use kube::Api;
use kube::api::ListParams;

/// The label of a mesh route ConfigMap (the meshed Service) and of a session's objects.
const MESH_OF: &str = crate::mesh::LABEL_MESH_OF;
const SESSION_LABEL: &str = "kt.dev/session";

/// How long one restore may take in all (it runs while the session ends).
const RESTORE_TIMEOUT: Duration = Duration::from_secs(20);

/// An object the session changed: `service/<name>` or `deployment/<name>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changed {
    /// A Service whose selector was taken.
    Service(String),
    /// A Deployment scaled to 0.
    Deployment(String),
    /// A Service this session meshes through the shared router: restored when no other
    /// session has a route left on it.
    Mesh(String),
}

impl std::str::FromStr for Changed {
    type Err = String;
    fn from_str(s: &str) -> Result<Changed, String> {
        match s.split_once('/') {
            Some(("service", n)) if !n.is_empty() => Ok(Changed::Service(n.into())),
            Some(("deployment", n)) if !n.is_empty() => Ok(Changed::Deployment(n.into())),
            Some(("mesh", n)) if !n.is_empty() => Ok(Changed::Mesh(n.into())),
            _ => Err(format!(
                "{s:?} is none of service/<name>, deployment/<name>, mesh/<name>"
            )),
        }
    }
}

/// Undoes `session`'s change to each object (objects another session changed since, or that
/// nobody changed, are left alone). Errors are logged, not returned: the session ends anyway.
pub async fn restore(client: kube::Client, ns: &str, session: &str, objects: &[Changed]) {
    for obj in objects {
        let r = tokio::time::timeout(RESTORE_TIMEOUT, restore_one(&client, ns, session, obj)).await;
        match r {
            Ok(Ok(true)) => tracing::info!(object = ?obj, "restored what the session changed"),
            Ok(Ok(false)) => tracing::debug!(object = ?obj, "nothing of this session to restore"),
            Ok(Err(e)) => tracing::error!(object = ?obj, error = %e, "cannot restore"),
            Err(_) => {
                tracing::error!(object = ?obj, timeout = ?RESTORE_TIMEOUT, "restoring timed out")
            }
        }
    }
}

async fn restore_one(
    client: &kube::Client,
    ns: &str,
    session: &str,
    obj: &Changed,
) -> Result<bool, ModifyError<changes::UndoError>> {
    let mut changed = false;
    match obj {
        Changed::Service(name) => {
            let api: Api<Service> = Api::namespaced(client.clone(), ns);
            changes::modify(&api, name, |s| {
                changed = changes::undo_selector(s, Some(session))?;
                Ok(changed)
            })
            .await?;
        }
        Changed::Mesh(name) => {
            let routes: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
            let others = routes
                .list(&ListParams::default().labels(&format!("{MESH_OF}={name}")))
                .await
                .map_err(ModifyError::Api)?
                .items
                .into_iter()
                .filter(|c| c.metadata.deletion_timestamp.is_none())
                .filter(|c| {
                    c.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(SESSION_LABEL))
                        .is_none_or(|s| s != session)
                })
                .count();
            if others > 0 {
                tracing::info!(service = %name, others, "other sessions still mesh the service; it stays with the router");
                return Ok(false);
            }
            let api: Api<Service> = Api::namespaced(client.clone(), ns);
            changes::modify(&api, name, |s| {
                changed = changes::undo_selector(s, Some(changes::BY_MESH_ROUTER))?;
                Ok(changed)
            })
            .await?;
        }
        Changed::Deployment(name) => {
            let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
            changes::modify(&api, name, |d| {
                changed = changes::undo_replicas(d, Some(session)).is_some();
                Ok::<_, changes::UndoError>(changed)
            })
            .await?;
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_objects_parse() {
        assert_eq!(
            "service/nginx".parse::<Changed>(),
            Ok(Changed::Service("nginx".into()))
        );
        assert_eq!(
            "deployment/web".parse::<Changed>(),
            Ok(Changed::Deployment("web".into()))
        );
        assert_eq!(
            "mesh/nginx".parse::<Changed>(),
            Ok(Changed::Mesh("nginx".into()))
        );
        for bad in ["nginx", "service/", "pod/x"] {
            assert!(bad.parse::<Changed>().is_err(), "{bad}");
        }
    }
}
