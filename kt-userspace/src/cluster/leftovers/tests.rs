use super::*;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

fn anchor(id: &str, idle: i64) -> Anchor {
    Anchor {
        id: id.into(),
        lease: format!("ktctl-{id}"),
        command: "exchange".into(),
        owner: "alice@laptop".into(),
        grace_secs: 30,
        idle_secs: Some(idle),
        since: "2026-12-02T08:00:00Z".into(),
    }
}

fn by(session: &str) -> Holder {
    Holder {
        session: session.into(),
        owner: "alice@laptop".into(),
        since: "2026-12-02T08:00:00Z".into(),
    }
}

fn meta(name: &str, annotations: &[(&str, &str)], labels: &[(&str, &str)]) -> ObjectMeta {
    let map = |kv: &[(&str, &str)]| {
        Some(
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    };
    ObjectMeta {
        name: Some(name.into()),
        annotations: map(annotations),
        labels: map(labels),
        ..Default::default()
    }
}

fn service(name: &str, changed_by: &str) -> Service {
    Service {
        metadata: meta(name, &[(changes::CHANGED_BY, changed_by)], &[]),
        ..Default::default()
    }
}

fn deployment(name: &str, changed_by: &str) -> Deployment {
    Deployment {
        metadata: meta(name, &[(changes::CHANGED_BY, changed_by)], &[]),
        ..Default::default()
    }
}

fn route(service: &str, session: &str) -> ConfigMap {
    ConfigMap {
        metadata: meta(
            &format!("{service}-kt-mesh-{session}"),
            &[],
            &[(changes::MESH_OF, service), (SESSION_LABEL, session)],
        ),
        ..Default::default()
    }
}

fn lock(service: &str, owners: &[&str]) -> Lease {
    let mut l = Lease {
        metadata: meta(&format!("{service}-kt-lock"), &[], &[(ROLE_LABEL, "lock")]),
        ..Default::default()
    };
    l.metadata.owner_references = Some(
        owners
            .iter()
            .map(|id| OwnerReference {
                kind: "Lease".into(),
                name: format!("ktctl-{id}"),
                ..Default::default()
            })
            .collect(),
    );
    l
}

/// `clean`'s rule: alive when renewed within 60 s.
fn within_a_minute(a: &Anchor) -> bool {
    a.alive_within(60)
}

#[test]
fn clean_undoes_and_removes_only_what_dead_sessions_left() {
    let survey = Survey {
        anchors: vec![anchor("live", 3), anchor("dead", 600)],
        services: vec![
            service("web", "live"),
            service("api", "dead"),
            // Its anchor is gone altogether (deleted by an earlier start of ktctl).
            service("db", "gone"),
        ],
        deployments: vec![deployment("worker", "dead"), deployment("cron", "live")],
        routes: vec![],
        locks: vec![lock("web", &["live"]), lock("api", &["dead"])],
    };
    let steps = survey.clean(within_a_minute);
    assert_eq!(
        steps,
        vec![
            Step::Selector {
                service: "api".into(),
                holder: Holder {
                    owner: String::new(),
                    since: String::new(),
                    ..by("dead")
                },
            },
            Step::Selector {
                service: "db".into(),
                holder: Holder {
                    owner: String::new(),
                    since: String::new(),
                    ..by("gone")
                },
            },
            Step::Replicas {
                deployment: "worker".into(),
                holder: Holder {
                    owner: String::new(),
                    since: String::new(),
                    ..by("dead")
                },
            },
            Step::Session(anchor("dead", 600)),
            Step::Lock {
                name: "api-kt-lock".into()
            },
        ]
    );
}

#[test]
fn a_mesh_is_cleaned_only_when_no_live_developer_has_a_route() {
    let mut survey = Survey {
        anchors: vec![anchor("a", 3), anchor("b", 900)],
        services: vec![service("web", changes::BY_MESH_ROUTER)],
        routes: vec![route("web", "a"), route("web", "b")],
        locks: vec![lock("web", &["a", "b"])],
        ..Default::default()
    };
    assert_eq!(
        survey.clean(within_a_minute),
        vec![Step::Session(anchor("b", 900))],
        "developer a still meshes: the Service and the shared lock stay"
    );
    survey.anchors[0].idle_secs = Some(3600);
    let steps = survey.clean(within_a_minute);
    assert!(
        steps
            .iter()
            .any(|s| matches!(s, Step::Selector { service, .. } if service == "web")),
        "{steps:?}"
    );
    assert!(steps.contains(&Step::Lock {
        name: "web-kt-lock".into()
    }));
}

#[test]
fn an_anchor_of_unknown_age_is_never_taken_for_dead() {
    let mut a = anchor("x", 0);
    a.idle_secs = None;
    let survey = Survey {
        anchors: vec![a],
        services: vec![service("web", "x")],
        ..Default::default()
    };
    assert_eq!(survey.clean(within_a_minute), vec![]);
}

#[test]
fn recover_takes_everything_of_the_sessions_holding_the_service() {
    let survey = Survey {
        anchors: vec![anchor("dead", 600), anchor("other", 600)],
        services: vec![service("web", "dead"), service("api", "other")],
        deployments: vec![deployment("web", "dead"), deployment("api", "other")],
        locks: vec![lock("web", &["dead"]), lock("api", &["other"])],
        ..Default::default()
    };
    let steps = survey.recover("web", within_a_minute).expect("dead");
    let lines: Vec<String> = steps.iter().map(|s| s.describe(true)).collect();
    assert_eq!(
        lines,
        [
            "Restored the selector of service 'web' (taken by session dead)",
            "Restored the replicas of deployment 'web' (scaled to 0 by session dead)",
            "Removed session dead (exchange by alice@laptop), silent for 10m: lease ktctl-dead and the objects it owns",
            "Removed lock web-kt-lock",
        ]
    );
    assert!(
        survey
            .recover("nothing", within_a_minute)
            .expect("ok")
            .is_empty(),
        "a Service nobody changed: nothing to do"
    );
}

#[test]
fn recover_refuses_while_a_holder_is_alive_naming_it() {
    let survey = Survey {
        anchors: vec![anchor("a", 3), anchor("b", 900)],
        services: vec![service("web", changes::BY_MESH_ROUTER)],
        routes: vec![route("web", "a"), route("web", "b")],
        locks: vec![lock("web", &["a", "b"])],
        ..Default::default()
    };
    let e = survey
        .recover("web", within_a_minute)
        .expect_err("a is alive");
    assert_eq!(e.0.id, "a");
    let text = e.to_string();
    assert!(
        text.contains("session a (exchange by alice@laptop) is alive"),
        "{text}"
    );
    assert!(text.contains("renewed 3s ago"), "{text}");
}

#[test]
fn dry_run_lines_say_would() {
    let s = Step::Lock {
        name: "web-kt-lock".into(),
    };
    assert_eq!(s.describe(false), "Would remove lock web-kt-lock");
    let s = Step::Selector {
        service: "web".into(),
        holder: by(changes::BY_MESH_ROUTER),
    };
    assert_eq!(
        s.describe(false),
        "Would restore the selector of service 'web' (meshed)"
    );
}
