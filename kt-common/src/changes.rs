//! What ktctl changes in its users' objects, written on the objects themselves.
//!
//! As kt-connect does, every change to an object ktctl did not create (a Service's selector,
//! a Deployment's replicas) is recorded on that object in annotations before it is made: what
//! the original was and which session changed it. Whoever comes next can then undo it from the
//! object alone: ktctl on exit, the shadow when ktctl has been gone for the grace period, the
//! mesh router when its last developer left, `ktctl recover` and `ktctl clean`, from any machine.
//!
//! Every write is a read-modify-`replace` carrying the resourceVersion that was read, so a
//! concurrent writer makes it retry on the fresh object instead of being overwritten.

use std::collections::BTreeMap;
use std::format;
use std::string::{String, ToString};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::PostParams;
use serde::de::DeserializeOwned;

/// The session that changed the object (or `mesh-router` for a shared mesh).
pub const CHANGED_BY: &str = "kt.dev/changed-by";
/// When, as RFC 3339 (the changer's clock; for people, never compared).
pub const CHANGED_AT: &str = "kt.dev/changed-at";
/// Who: `user@machine`.
pub const CHANGED_BY_OWNER: &str = "kt.dev/changed-by-owner";
/// The Service's original selector, as a JSON object.
pub const ORIGINAL_SELECTOR: &str = "kt.dev/original-selector";
/// The workload's original replicas.
pub const ORIGINAL_REPLICAS: &str = "kt.dev/original-replicas";
/// Present while the mesh router holds the Service (its value: the router's name).
pub const MESH_ROUTER: &str = "kt.dev/mesh-router";
/// The label of a mesh route ConfigMap (and of the mesh's shared objects): the meshed Service.
pub const MESH_OF: &str = "kt.dev/mesh-of";
/// Label of a shadow pod that asks the router DaemonSet (`kt-router node`) to steer its
/// namespace's Service of that name to it (`exchange --mode ebpf`); nothing in the Service or
/// its workload changes.
pub const STEER_LABEL: &str = "kt.dev/steer-service";
/// Label of a shadow pod of `mesh --mode ebpf`: the meshed Service (in the shadow's namespace),
/// whose TCP traffic every node's router steers to its own mesh proxy, which sends requests
/// carrying the shadow's header ([`MESH_HEADER`]: [`MESH_VALUE`]) to the shadow.
pub const MESH_EBPF: &str = "kt.dev/mesh-ebpf";
/// Annotation of a `mesh --mode ebpf` shadow: the header name of its route.
pub const MESH_HEADER: &str = "kt.dev/mesh-header";
/// Annotation of a `mesh --mode ebpf` shadow: the header value of its route.
pub const MESH_VALUE: &str = "kt.dev/mesh-value";
/// Namespace of the router DaemonSet (deploy/router.yaml).
pub const ROUTER_NAMESPACE: &str = "kt-system";
/// Name of the router DaemonSet.
pub const ROUTER_DAEMONSET: &str = "kt-router";
/// The `CHANGED_BY` value of a Service held by a shared mesh router.
pub const BY_MESH_ROUTER: &str = "mesh-router";

const OURS: [&str; 6] = [
    CHANGED_BY,
    CHANGED_AT,
    CHANGED_BY_OWNER,
    ORIGINAL_SELECTOR,
    ORIGINAL_REPLICAS,
    MESH_ROUTER,
];

/// Who changed an object, as its annotations say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// Session id (or [`BY_MESH_ROUTER`]).
    pub session: String,
    /// `user@machine`, when recorded.
    pub owner: String,
    /// When, when recorded.
    pub since: String,
}

impl core::fmt::Display for Holder {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "session {}", self.session)?;
        if !self.owner.is_empty() {
            write!(f, " of {}", self.owner)?;
        }
        if !self.since.is_empty() {
            write!(f, " since {}", self.since)?;
        }
        Ok(())
    }
}

/// The holder recorded on an object, if any.
pub fn holder(annotations: Option<&BTreeMap<String, String>>) -> Option<Holder> {
    let a = annotations?;
    let get = |k: &str| a.get(k).cloned().unwrap_or_default();
    a.get(CHANGED_BY).map(|s| Holder {
        session: s.clone(),
        owner: get(CHANGED_BY_OWNER),
        since: get(CHANGED_AT),
    })
}

fn record(annotations: &mut Option<BTreeMap<String, String>>, by: &Holder) {
    let a = annotations.get_or_insert_with(BTreeMap::new);
    a.insert(CHANGED_BY.into(), by.session.clone());
    a.insert(CHANGED_BY_OWNER.into(), by.owner.clone());
    a.insert(CHANGED_AT.into(), by.since.clone());
}

fn forget(annotations: &mut Option<BTreeMap<String, String>>) {
    if let Some(a) = annotations.as_mut() {
        for k in OURS {
            a.remove(k);
        }
    }
}

/// Points a Service's selector at `selector`, recording the original and `by` first.
/// Refuses (returning the holder) a Service another session already changed.
pub fn take_selector(
    svc: &mut Service,
    by: &Holder,
    selector: BTreeMap<String, String>,
) -> Result<(), Holder> {
    if let Some(h) = holder(svc.metadata.annotations.as_ref())
        && h.session != by.session
    {
        return Err(h);
    }
    let spec = svc.spec.get_or_insert_with(Default::default);
    let a = svc.metadata.annotations.get_or_insert_with(BTreeMap::new);
    if !a.contains_key(ORIGINAL_SELECTOR) {
        let original = spec.selector.clone().unwrap_or_default();
        a.insert(
            ORIGINAL_SELECTOR.into(),
            serde_json::to_string(&original).expect("a string map serialises"),
        );
    }
    record(&mut svc.metadata.annotations, by);
    spec.selector = Some(selector);
    Ok(())
}

/// The original selector recorded on a Service.
pub fn original_selector(svc: &Service) -> Option<BTreeMap<String, String>> {
    let raw = svc.metadata.annotations.as_ref()?.get(ORIGINAL_SELECTOR)?;
    serde_json::from_str(raw).ok()
}

/// Why a recorded change cannot be undone: its record is damaged. Nothing is changed then, so
/// that a person can still see what was there.
#[derive(Debug, thiserror::Error)]
pub enum UndoError {
    /// The original selector is not recorded.
    #[error(
        "{object} is recorded as changed by ktctl but has no {ORIGINAL_SELECTOR} annotation: set its selector back by hand and remove the kt.dev/ annotations"
    )]
    NoOriginal {
        /// The object (`service/<name>`).
        object: String,
    },
    /// The recorded original selector does not parse.
    #[error(
        "the {ORIGINAL_SELECTOR} annotation of {object} is not a JSON object of strings ({error}): set its selector back by hand and remove the kt.dev/ annotations"
    )]
    BadOriginal {
        /// The object (`service/<name>`).
        object: String,
        /// Why it does not parse.
        #[source]
        error: serde_json::Error,
    },
}

/// Puts back a Service's original selector and removes the record, if `session` changed it
/// (any session when `None`, as `recover` does; [`BY_MESH_ROUTER`] for a mesh). Whether
/// anything changed; an error, changing nothing, when the record is damaged.
pub fn undo_selector(svc: &mut Service, session: Option<&str>) -> Result<bool, UndoError> {
    let Some(h) = holder(svc.metadata.annotations.as_ref()) else {
        return Ok(false);
    };
    if session.is_some_and(|s| s != h.session) {
        return Ok(false);
    }
    let object = || describe("service", svc.metadata.name.as_deref().unwrap_or_default());
    let raw = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ORIGINAL_SELECTOR))
        .ok_or_else(|| UndoError::NoOriginal { object: object() })?;
    let original: BTreeMap<String, String> =
        serde_json::from_str(raw).map_err(|error| UndoError::BadOriginal {
            object: object(),
            error,
        })?;
    svc.spec.get_or_insert_with(Default::default).selector = Some(original);
    forget(&mut svc.metadata.annotations);
    Ok(true)
}

/// Scales a Deployment to 0, recording its replicas and `by` first; the replicas it had.
pub fn take_replicas(dep: &mut Deployment, by: &Holder) -> Result<i32, Holder> {
    if let Some(h) = holder(dep.metadata.annotations.as_ref())
        && h.session != by.session
    {
        return Err(h);
    }
    let replicas = dep.spec.replicas.unwrap_or(1);
    let a = dep.metadata.annotations.get_or_insert_with(BTreeMap::new);
    let original = match a.get(ORIGINAL_REPLICAS).and_then(|r| r.parse().ok()) {
        Some(r) => r,
        None => {
            a.insert(ORIGINAL_REPLICAS.into(), replicas.to_string());
            replicas
        }
    };
    record(&mut dep.metadata.annotations, by);
    dep.spec.replicas = Some(0);
    Ok(original)
}

/// Puts back a Deployment's replicas and removes the record, if `session` changed it (any when
/// `None`); the replicas restored.
pub fn undo_replicas(dep: &mut Deployment, session: Option<&str>) -> Option<i32> {
    let h = holder(dep.metadata.annotations.as_ref())?;
    if session.is_some_and(|s| s != h.session) {
        return None;
    }
    let original = dep
        .metadata
        .annotations
        .as_ref()?
        .get(ORIGINAL_REPLICAS)
        .and_then(|r| r.parse::<i32>().ok())
        .unwrap_or(1);
    dep.spec.replicas = Some(original);
    forget(&mut dep.metadata.annotations);
    Some(original)
}

/// Why [`modify`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ModifyError<E: core::fmt::Display> {
    /// The change itself refused (e.g. another session holds the object).
    #[error("{0}")]
    Refused(E),
    /// The API server refused or did not answer.
    #[error("{0}")]
    Api(#[source] kube::Error),
}

/// Reads `name`, applies `change` and writes it back with the resourceVersion read, retrying
/// (up to 8 times) when another writer got in between. `change` returns `Ok(false)` for
/// "nothing to do"; the object is then not written. Returns the object as written (or as read
/// when unchanged), `None` if it does not exist.
pub async fn modify<K, E>(
    api: &Api<K>,
    name: &str,
    mut change: impl FnMut(&mut K) -> Result<bool, E>,
) -> Result<Option<K>, ModifyError<E>>
where
    K: kube::Resource + Clone + DeserializeOwned + serde::Serialize + core::fmt::Debug,
    E: core::fmt::Display,
{
    let mut tries = 0;
    loop {
        tries += 1;
        let Some(mut obj) = api.get_opt(name).await.map_err(ModifyError::Api)? else {
            return Ok(None);
        };
        if !change(&mut obj).map_err(ModifyError::Refused)? {
            return Ok(Some(obj));
        }
        match api.replace(name, &PostParams::default(), &obj).await {
            Ok(o) => return Ok(Some(o)),
            Err(kube::Error::Api(s)) if s.code == 409 && tries < 8 => continue,
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(None),
            Err(e) => return Err(ModifyError::Api(e)),
        }
    }
}

/// A description of an object for messages (`service/nginx`).
pub fn describe(kind: &str, name: &str) -> String {
    format!("{kind}/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ServiceSpec;

    fn by(s: &str) -> Holder {
        Holder {
            session: s.into(),
            owner: "alice@laptop".into(),
            since: "2026-12-02T08:00:00Z".into(),
        }
    }

    fn svc(selector: &[(&str, &str)]) -> Service {
        Service {
            spec: Some(ServiceSpec {
                selector: Some(
                    selector
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_taken_selector_is_recorded_and_undone_to_the_original_exactly() {
        let original = svc(&[("app", "nginx"), ("tier", "web")]);
        let mut s = original.clone();
        let ours = BTreeMap::from([("kt.dev/session".to_string(), "abc".to_string())]);
        take_selector(&mut s, &by("abc"), ours.clone()).expect("free");
        assert_eq!(s.spec.as_ref().unwrap().selector.as_ref(), Some(&ours));
        assert_eq!(holder(s.metadata.annotations.as_ref()), Some(by("abc")));
        // Taking again (a replay after a reconnect) keeps the first original.
        take_selector(&mut s, &by("abc"), ours).expect("ours");
        assert!(
            !undo_selector(&mut s, Some("other")).expect("sound"),
            "not its change"
        );
        assert!(undo_selector(&mut s, Some("abc")).expect("sound"));
        assert_eq!(s.spec, original.spec);
        assert_eq!(
            s.metadata.annotations.unwrap_or_default(),
            BTreeMap::new(),
            "no record left"
        );
    }

    #[test]
    fn a_mesh_is_undone_leaving_only_the_users_annotations() {
        let mut s = svc(&[("app", "nginx"), ("tier", "web")]);
        s.metadata.name = Some("nginx".into());
        s.metadata.annotations = Some(BTreeMap::from([("team".into(), "web".into())]));
        let original = s.clone();
        take_selector(&mut s, &by(BY_MESH_ROUTER), BTreeMap::new()).expect("free");
        s.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(MESH_ROUTER.into(), "nginx-kt-router".into());
        assert!(
            !undo_selector(&mut s, Some("abc")).expect("sound"),
            "a session's undo leaves a mesh"
        );
        assert!(undo_selector(&mut s, Some(BY_MESH_ROUTER)).expect("sound"));
        assert_eq!(s, original);
    }

    #[test]
    fn a_damaged_record_is_an_error_that_names_the_service_and_changes_nothing() {
        let mut s = svc(&[("kt.dev/mesh-router", "nginx")]);
        s.metadata.name = Some("nginx".into());
        s.metadata.annotations = Some(BTreeMap::from([(CHANGED_BY.into(), BY_MESH_ROUTER.into())]));
        let before = s.clone();
        let e = undo_selector(&mut s, None).expect_err("no original");
        assert!(matches!(e, UndoError::NoOriginal { .. }), "{e:?}");
        assert!(e.to_string().contains("service/nginx"), "{e}");
        assert!(e.to_string().contains("by hand"), "{e}");
        s.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(ORIGINAL_SELECTOR.into(), r#"{"app":1}"#.into());
        let before_bad = s.clone();
        let e = undo_selector(&mut s, None).expect_err("bad original");
        assert!(matches!(e, UndoError::BadOriginal { .. }), "{e:?}");
        assert_eq!(s, before_bad, "nothing changed");
        assert_ne!(before, before_bad);
    }

    #[test]
    fn a_selector_another_session_holds_is_refused_naming_it() {
        let mut s = svc(&[("app", "nginx")]);
        take_selector(&mut s, &by("one"), BTreeMap::new()).expect("free");
        let h = take_selector(&mut s, &by("two"), BTreeMap::new()).expect_err("held");
        assert_eq!(h.session, "one");
        assert_eq!(
            h.to_string(),
            "session one of alice@laptop since 2026-12-02T08:00:00Z"
        );
    }

    #[test]
    fn replicas_are_recorded_and_restored() {
        let mut d = Deployment::default();
        d.spec.replicas = Some(3);
        assert_eq!(take_replicas(&mut d, &by("abc")), Ok(3));
        assert_eq!(d.spec.replicas, Some(0));
        assert_eq!(take_replicas(&mut d, &by("abc")), Ok(3), "replayed");
        assert!(take_replicas(&mut d, &by("x")).is_err());
        assert_eq!(undo_replicas(&mut d, None), Some(3));
        assert_eq!(d.spec.replicas, Some(3));
        assert_eq!(undo_replicas(&mut d, None), None, "nothing left to undo");
    }
}
