//! Sessions. Every ktctl run that changes the cluster is a session with an id; its objects
//! carry `app.kubernetes.io/managed-by=ktctl` and `kt.dev/session=<id>` and an owner
//! reference to the session's anchor, a `coordination.k8s.io/v1` Lease that ktctl renews.
//! Deleting the anchor lets Kubernetes' garbage collector remove everything else; the shadow
//! deletes it when the Lease goes stale for longer than the grace period (ktctl died).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use super::{ClusterError, Kube};

pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const SESSION_LABEL: &str = "kt.dev/session";
pub const ROLE_LABEL: &str = "kt.dev/role";
pub const GRACE_ANNOTATION: &str = "kt.dev/grace-seconds";
pub const COMMAND_ANNOTATION: &str = "kt.dev/command";
pub const OWNER_ANNOTATION: &str = "kt.dev/owner";

/// A kind of object a session creates, for deletion and for the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Pod,
    ServiceAccount,
    Role,
    RoleBinding,
    Service,
    ConfigMap,
    /// A lock on a target (not the anchor, which is always last).
    Lease,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Pod => "pod",
            Kind::ServiceAccount => "serviceaccount",
            Kind::Role => "role",
            Kind::RoleBinding => "rolebinding",
            Kind::Service => "service",
            Kind::ConfigMap => "configmap",
            Kind::Lease => "lease",
        }
    }
}

/// One session in one namespace.
pub struct Session {
    pub id: String,
    pub namespace: String,
    pub lease: String,
    pub grace: Duration,
    /// Who runs it: `user@machine`.
    pub owner: String,
    /// When it began (RFC 3339, this machine's clock: for people to read).
    pub since: String,
    lease_uid: String,
    client: Client,
    created: Mutex<Vec<(Kind, String)>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("namespace", &self.namespace)
            .finish()
    }
}

/// A new random session id: 6 characters of [a-z0-9], DNS-label safe.
pub fn new_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 6];
    // getrandom(2) via std's hashmap keys would be indirect; read the kernel's pool directly.
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_err()
    {
        let t = Timestamp::now().as_nanosecond() as u64 ^ u64::from(std::process::id());
        bytes.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

impl Session {
    /// Creates the anchor Lease `ktctl-<id>`.
    pub async fn begin(
        kube: &Kube,
        command: &str,
        grace: Duration,
    ) -> Result<Session, ClusterError> {
        let id = new_id();
        let lease = format!("ktctl-{id}");
        let now = MicroTime(Timestamp::now());
        let user = std::env::var("SUDO_USER")
            .or_else(|_| std::env::var("USER"))
            .unwrap_or_else(|_| "root".into());
        let owner = format!("{user}@{}", hostname());
        let obj = Lease {
            metadata: ObjectMeta {
                name: Some(lease.clone()),
                namespace: Some(kube.namespace.clone()),
                labels: Some(base_labels(&id, "anchor")),
                annotations: Some(BTreeMap::from([
                    (GRACE_ANNOTATION.to_string(), grace.as_secs().to_string()),
                    (COMMAND_ANNOTATION.to_string(), command.to_string()),
                    (OWNER_ANNOTATION.to_string(), owner.clone()),
                ])),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(format!("ktctl/{}/{}", hostname(), std::process::id())),
                lease_duration_seconds: Some(grace.as_secs().max(1) as i32),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                ..Default::default()
            }),
        };
        let created = Api::<Lease>::namespaced(kube.client.clone(), &kube.namespace)
            .create(&PostParams::default(), &obj)
            .await
            .map_err(|e| ClusterError::api(format!("creating lease {lease}"), e))?;
        crate::pidfile::update(|r| r.session = Some(id.clone()));
        Ok(Session {
            id,
            namespace: kube.namespace.clone(),
            lease,
            grace,
            owner,
            since: Timestamp::now()
                .round(k8s_openapi::jiff::Unit::Second)
                .map(|t| t.to_string())
                .unwrap_or_default(),
            lease_uid: created.metadata.uid.unwrap_or_default(),
            client: kube.client.clone(),
            created: Mutex::new(vec![]),
        })
    }

    /// Labels for an object of this session playing `role`.
    pub fn labels(&self, role: &str) -> BTreeMap<String, String> {
        base_labels(&self.id, role)
    }

    /// Metadata for a new object of this session: labels and the owner reference.
    pub fn meta(&self, name: &str, role: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels(role)),
            owner_references: Some(vec![self.owner_reference()]),
            ..Default::default()
        }
    }

    /// The reference to the session's anchor, as its objects' controller: garbage collection
    /// removes them with the anchor, and no workload controller adopts a shadow that carries
    /// its pod labels (scale mode), as a pod with a controller is never adopted.
    pub fn owner_reference(&self) -> OwnerReference {
        OwnerReference {
            api_version: "coordination.k8s.io/v1".into(),
            kind: "Lease".into(),
            name: self.lease.clone(),
            uid: self.lease_uid.clone(),
            controller: Some(true),
            ..Default::default()
        }
    }

    /// This session as the holder recorded on the objects it changes.
    pub fn holder(&self) -> kt_common::changes::Holder {
        kt_common::changes::Holder {
            session: self.id.clone(),
            owner: self.owner.clone(),
            since: self.since.clone(),
        }
    }

    /// Creates an object and remembers it for [`Session::end`].
    pub async fn create<K>(&self, kind: Kind, obj: &K) -> Result<K, ClusterError>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let name = obj.meta().name.clone().unwrap_or_default();
        let api: Api<K> = Api::namespaced(self.client.clone(), &self.namespace);
        let out = api
            .create(&PostParams::default(), obj)
            .await
            .map_err(|e| ClusterError::api(format!("creating {} {name}", kind.name()), e))?;
        crate::pidfile::update(|r| r.changed.push(format!("{}/{name}", kind.name())));
        self.created
            .lock()
            .expect("session lock")
            .push((kind, name));
        Ok(out)
    }

    /// Every object of the session so far (`kind/name`), the anchor Lease last.
    pub fn created(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .created
            .lock()
            .expect("session lock")
            .iter()
            .map(|(k, n)| format!("{}/{n}", k.name()))
            .collect();
        out.push(format!("lease/{}", self.lease));
        out
    }

    /// Renews the Lease every third of the grace period until the task is aborted; cancels
    /// `lost` if the Lease is gone (the cluster ended the session).
    pub fn spawn_renewer(
        &self,
        lost: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &self.namespace);
        let name = self.lease.clone();
        let every = (self.grace / 3).max(Duration::from_secs(1));
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                tokio::time::sleep(every).await;
                let patch =
                    serde_json::json!({ "spec": { "renewTime": MicroTime(Timestamp::now()) } });
                // Each renewal is bounded by the renewal period, as client-go's leader election
                // bounds each try by its RenewDeadline: a hung call is given up, and the next
                // renewal is tried on time.
                let r = tokio::time::timeout(
                    every,
                    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)),
                )
                .await
                .unwrap_or_else(|_| {
                    Err(kube::Error::Service(
                        format!("no answer within {every:?}").into(),
                    ))
                });
                match r {
                    Ok(_) if failing => {
                        tracing::info!(lease = %name, "session lease renewed again");
                        failing = false;
                    }
                    Ok(_) => {}
                    Err(kube::Error::Api(st)) if st.code == 404 => {
                        tracing::error!(lease = %name, "the session's lease is gone: the cluster ended this session");
                        lost.cancel();
                        return;
                    }
                    Err(e) => {
                        if !failing {
                            tracing::warn!(lease = %name, error = %e, "cannot renew the session lease; the shadow gives ktctl a full --grace once the API server answers again");
                        }
                        failing = true;
                    }
                }
            }
        })
    }

    /// Deletes every object of the session, the anchor last; returns what it deleted.
    pub async fn end(&self) -> Vec<String> {
        let created: Vec<(Kind, String)> = self
            .created
            .lock()
            .expect("session lock")
            .iter()
            .rev()
            .cloned()
            .collect();
        let mut report = vec![];
        for (kind, name) in created {
            let ok = match kind {
                Kind::Pod => {
                    delete::<Pod>(
                        &self.client,
                        &self.namespace,
                        &name,
                        DeleteParams::default().grace_period(0),
                    )
                    .await
                }
                Kind::ServiceAccount => {
                    delete::<ServiceAccount>(
                        &self.client,
                        &self.namespace,
                        &name,
                        DeleteParams::default(),
                    )
                    .await
                }
                Kind::Role => {
                    delete::<Role>(
                        &self.client,
                        &self.namespace,
                        &name,
                        DeleteParams::default(),
                    )
                    .await
                }
                Kind::RoleBinding => {
                    delete::<RoleBinding>(
                        &self.client,
                        &self.namespace,
                        &name,
                        DeleteParams::default(),
                    )
                    .await
                }
                Kind::Service => {
                    delete::<Service>(
                        &self.client,
                        &self.namespace,
                        &name,
                        DeleteParams::default(),
                    )
                    .await
                }
                Kind::ConfigMap => {
                    delete::<ConfigMap>(
                        &self.client,
                        &self.namespace,
                        &name,
                        DeleteParams::default(),
                    )
                    .await
                }
                Kind::Lease => {
                    delete::<Lease>(
                        &self.client,
                        &self.namespace,
                        &name,
                        DeleteParams::default(),
                    )
                    .await
                }
            };
            if ok {
                report.push(format!("{}/{name}", kind.name()));
            }
        }
        if delete::<Lease>(
            &self.client,
            &self.namespace,
            &self.lease,
            DeleteParams::background(),
        )
        .await
        {
            report.push(format!("lease/{}", self.lease));
        }
        report
    }
}

/// Deletes the anchors of sessions whose Lease went stale more than twice its grace period
/// ago (a ktctl that died and whose shadow could not clean up either); their objects follow by
/// garbage collection. Returns the ids removed.
///
/// No machine's clock is compared with another's: the Lease's `renewTime` comes from its own
/// ktctl's clock, which may be hours off. Staleness is the API server's time now (its `Date`
/// header) minus the API server's time of the Lease's last change (`managedFields[].time`,
/// which the API server stamps on every renewal).
pub async fn clean_expired(kube: &Kube) -> Result<Vec<String>, ClusterError> {
    let api: Api<Lease> = Api::namespaced(kube.client.clone(), &kube.namespace);
    let leases = api
        .list(
            &kube::api::ListParams::default()
                .labels(&format!("{MANAGED_BY}=ktctl,{ROLE_LABEL}=anchor")),
        )
        .await
        .map_err(|e| ClusterError::api("listing ktctl sessions (leases)", e))?;
    if leases.items.is_empty() {
        return Ok(vec![]);
    }
    let now = server_now(&kube.client).await?;
    let mut removed = vec![];
    for l in leases.items {
        if !is_expired(&l, now) {
            continue;
        }
        let name = l.metadata.name.clone().unwrap_or_default();
        if delete::<Lease>(
            &kube.client,
            &kube.namespace,
            &name,
            DeleteParams::background(),
        )
        .await
        {
            removed.push(
                l.metadata
                    .labels
                    .and_then(|m| m.get(SESSION_LABEL).cloned())
                    .unwrap_or(name),
            );
        }
    }
    Ok(removed)
}

/// The API server's clock, from the `Date` header of a cheap request.
pub async fn server_now(client: &Client) -> Result<Timestamp, ClusterError> {
    let req = http::Request::get("/version")
        .body(kube::client::Body::empty())
        .map_err(|e| ClusterError::Shadow(format!("building a request: {e}")))?;
    let resp = client
        .send(req)
        .await
        .map_err(|e| ClusterError::api("reading the API server's clock (GET /version)", e))?;
    let date = resp
        .headers()
        .get(http::header::DATE)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ClusterError::Shadow("the API server's answer has no Date header".into()))?;
    static PARSER: k8s_openapi::jiff::fmt::rfc2822::DateTimeParser =
        k8s_openapi::jiff::fmt::rfc2822::DateTimeParser::new();
    PARSER
        .parse_timestamp(date)
        .map_err(|e| ClusterError::Shadow(format!("the API server's Date header {date:?}: {e}")))
}

/// Whether an anchor Lease has gone unrenewed for more than twice its grace period (one grace
/// period more than the shadow waits, so the shadow gets the first chance to clean up), both
/// ends read on the API server's clock. A Lease without managedFields is never expired here.
pub fn is_expired(l: &Lease, server_now: Timestamp) -> bool {
    let grace = i64::from(
        l.spec
            .as_ref()
            .and_then(|s| s.lease_duration_seconds)
            .unwrap_or(30)
            .max(1),
    );
    idle_seconds(l, server_now).is_some_and(|idle| idle > 2 * grace)
}

/// Seconds since the API server last changed a Lease (`managedFields[].time`, which it stamps
/// on every renewal), on its own clock; `None` without managedFields.
pub fn idle_seconds(l: &Lease, server_now: Timestamp) -> Option<i64> {
    let changed = l
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.time.as_ref().map(|t| t.0))
        .max()?;
    Some(server_now.as_second() - changed.as_second())
}

fn base_labels(id: &str, role: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY.to_string(), "ktctl".to_string()),
        (SESSION_LABEL.to_string(), id.to_string()),
        (ROLE_LABEL.to_string(), role.to_string()),
    ])
}

/// Deletes one object; true if it existed and is gone (a missing one is fine and says false).
async fn delete<K>(client: &Client, ns: &str, name: &str, dp: DeleteParams) -> bool
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    match Api::<K>::namespaced(client.clone(), ns)
        .delete(name, &dp)
        .await
    {
        Ok(_) => true,
        Err(kube::Error::Api(s)) if s.code == 404 => false,
        Err(e) => {
            tracing::warn!(object = name, error = %e, "could not delete; `ktctl clean` removes it later");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, Time};

    fn lease(renewed_by_its_clock: Timestamp, changed_on_server: Option<Timestamp>) -> Lease {
        Lease {
            metadata: ObjectMeta {
                managed_fields: changed_on_server.map(|t| {
                    vec![ManagedFieldsEntry {
                        manager: Some("ktctl".into()),
                        time: Some(Time(t)),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                lease_duration_seconds: Some(30),
                renew_time: Some(MicroTime(renewed_by_its_clock)),
                ..Default::default()
            }),
        }
    }

    fn at(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    #[test]
    /// Regression: expiry compared the other ktctl's renewTime (its own clock) with this
    /// machine's clock, so a laptop whose clock was an hour off deleted live sessions.
    fn a_live_session_renewed_by_a_skewed_clock_is_not_expired() {
        let server_now = at("2026-12-02T10:00:00Z");
        // Its ktctl's clock is an hour behind; the API server stamped the change 5 s ago.
        let l = lease(at("2026-12-02T09:00:00Z"), Some(at("2026-12-02T09:59:55Z")));
        assert!(!is_expired(&l, server_now));
        // An hour ahead: the same.
        let l = lease(at("2026-12-02T11:00:00Z"), Some(at("2026-12-02T09:59:55Z")));
        assert!(!is_expired(&l, server_now));
    }

    #[test]
    fn a_session_unchanged_on_the_server_for_twice_its_grace_is_expired() {
        let server_now = at("2026-12-02T10:00:00Z");
        // Renewed "just now" by a clock that runs fast, but unchanged for 61 s on the server.
        let l = lease(at("2026-12-02T10:00:00Z"), Some(at("2026-12-02T09:58:59Z")));
        assert!(is_expired(&l, server_now));
        let l = lease(at("2026-12-02T10:00:00Z"), Some(at("2026-12-02T09:59:00Z")));
        assert!(
            !is_expired(&l, server_now),
            "exactly twice grace is not over it"
        );
        // Without the API server's timestamps ktctl cannot tell, so it leaves the session.
        let l = lease(at("2026-12-02T01:00:00Z"), None);
        assert!(!is_expired(&l, server_now));
    }

    /// An API server on loopback that never answers the first PATCH and answers every later
    /// one; returns its URL and the count of PATCHes it has seen.
    async fn api_that_hangs_once() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let patches = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = patches.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut c, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let Ok(n) = c.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        if !buf[..n].starts_with(b"PATCH") {
                            continue;
                        }
                        if seen.fetch_add(1, Ordering::SeqCst) == 0 {
                            // The first renewal hangs for good.
                            std::future::pending::<()>().await;
                        }
                        let body = br#"{"apiVersion":"coordination.k8s.io/v1","kind":"Lease","metadata":{"name":"ktctl-t"}}"#;
                        let head = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                            body.len()
                        );
                        if c.write_all(head.as_bytes()).await.is_err()
                            || c.write_all(body).await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        (url, patches)
    }

    #[tokio::test]
    /// Regression: one renewal that hung (an API server that stopped answering) stopped every
    /// later renewal, so the shadow ended a live session.
    async fn a_hung_renewal_does_not_stop_later_renewals() {
        let (url, patches) = api_that_hangs_once().await;
        let config = kube::Config::new(url.parse().expect("url"));
        let client = Client::try_from(config).expect("client");
        let session = Session {
            id: "t".into(),
            namespace: "default".into(),
            lease: "ktctl-t".into(),
            grace: Duration::from_secs(3),
            owner: "t@test".into(),
            since: String::new(),
            lease_uid: String::new(),
            client,
            created: Mutex::new(vec![]),
        };
        let lost = tokio_util::sync::CancellationToken::new();
        let renewer = session.spawn_renewer(lost.clone());
        // Renewals every second; the first one hangs.
        tokio::time::sleep(Duration::from_millis(4500)).await;
        renewer.abort();
        let n = patches.load(std::sync::atomic::Ordering::SeqCst);
        assert!(n >= 3, "only {n} renewals reached the API server");
        assert!(!lost.is_cancelled());
    }

    #[test]
    fn session_ids_are_dns_labels_and_differ() {
        let a = new_id();
        let b = new_id();
        assert_eq!(a.len(), 6);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        );
        assert_ne!(a, b);
    }
}
