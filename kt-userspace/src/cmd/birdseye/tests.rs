use super::*;

use k8s_openapi::api::core::v1::ServiceSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

fn anchor(id: &str, command: &str, owner: &str) -> Anchor {
    Anchor {
        id: id.into(),
        lease: format!("ktctl-{id}"),
        command: command.into(),
        owner: owner.into(),
        grace_secs: 30,
        idle_secs: Some(125),
        since: "2026-12-02T08:00:00Z".into(),
    }
}

fn meta(name: &str, labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> ObjectMeta {
    let map = |kv: &[(&str, &str)]| {
        Some(
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        )
    };
    ObjectMeta {
        name: Some(name.into()),
        labels: map(labels),
        annotations: map(annotations),
        ..Default::default()
    }
}

fn svc(name: &str, selector: &[(&str, &str)], labels: &[(&str, &str)]) -> Service {
    Service {
        metadata: meta(name, labels, &[]),
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

fn view() -> View {
    View {
        anchors: vec![
            anchor("ex1", "exchange", "alice@a"),
            anchor("me1", "mesh", "bob@b"),
            anchor("me2", "mesh", "carol@c"),
            anchor("pv1", "preview", "dan@d"),
            anchor("mm1", "mesh", "erin@e"),
            anchor("co1", "connect", "frank@f"),
            anchor("co2", "connect", "frank@f"),
        ],
        locks: vec![Lease {
            metadata: meta(
                "api-kt-lock",
                &[(ROLE_LABEL, "lock")],
                &[(LOCK_MODE, "exchange"), (changes::CHANGED_BY, "ex1")],
            ),
            ..Default::default()
        }],
        services: vec![
            svc("api", &[("app", "api")], &[]),
            svc("web", &[("kt.dev/mesh-router", "web")], &[]),
            svc(
                "web-kt-stuntman",
                &[("app", "web")],
                &[(MANAGED_BY, "ktctl"), (ROLE_LABEL, "mesh-router")],
            ),
            svc(
                "web-kt-mesh-abc",
                &[],
                &[(MANAGED_BY, "ktctl"), (ROLE_LABEL, "mesh-target")],
            ),
            svc(
                "v2",
                &[],
                &[
                    (MANAGED_BY, "ktctl"),
                    (ROLE_LABEL, "preview"),
                    (SESSION_LABEL, "pv1"),
                ],
            ),
            svc("db", &[("app", "db")], &[]),
            svc("shop", &[("app", "shop")], &[]),
        ],
        routes: vec![
            ConfigMap {
                metadata: meta(
                    "web-kt-mesh-b",
                    &[(changes::MESH_OF, "web"), (SESSION_LABEL, "me1")],
                    &[],
                ),
                ..Default::default()
            },
            ConfigMap {
                metadata: meta(
                    "web-kt-mesh-c",
                    &[(changes::MESH_OF, "web"), (SESSION_LABEL, "me2")],
                    &[],
                ),
                ..Default::default()
            },
        ],
        shadows: vec![Pod {
            metadata: meta(
                "kt-connect-shadow-mm1",
                &[
                    (ROLE_LABEL, "shadow-mesh"),
                    (SESSION_LABEL, "mm1"),
                    ("app", "shop"),
                    ("version", "x"),
                ],
                &[],
            ),
            ..Default::default()
        }],
    }
}

#[test]
fn every_kind_of_use_is_named_with_its_users_and_helpers_are_hidden() {
    let rows = view().rows(SortBy::Name, false);
    let text = render("dev", &rows, Some(&view().connectors()));
    assert_eq!(
        text,
        "---- Service in namespace dev ----\n\
         > api - exchanged by [alice@a] since 2026-12-02T08:00:00Z (session ex1)\n\
         > db - normal\n\
         > shop - meshed (manual) by [erin@e] since 2026-12-02T08:00:00Z (session mm1)\n\
         > v2 - previewing by [dan@d] since 2026-12-02T08:00:00Z (session pv1)\n\
         > web - meshed (auto) by [bob@b] since 2026-12-02T08:00:00Z (session me1), [carol@c] since 2026-12-02T08:00:00Z (session me2)\n\
         ---- User connecting to cluster ----\n\
         > frank@f (last active 2 min ago, session co1)\n\
         > frank@f (last active 2 min ago, session co2)\n\
         1 users in total\n"
    );
}

#[test]
fn sorting_by_status_and_hiding_natural_services() {
    let rows = view().rows(SortBy::Status, true);
    let order: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r.state.as_str(), r.service.as_str()))
        .collect();
    assert_eq!(
        order,
        [
            ("exchanged", "api"),
            ("meshed (auto)", "web"),
            ("meshed (manual)", "shop"),
            ("previewing", "v2"),
        ]
    );
}

#[test]
fn the_router_section_names_each_node_and_what_is_missing() {
    use crate::cluster::router::NodeRouter;
    let node = |n: &str, ready: bool| NodeRouter {
        node: n.into(),
        pod: format!("kt-router-{n}"),
        ready,
    };
    let h = RouterView::Installed(RouterHealth {
        desired: 2,
        nodes: vec![node("kt-node-1", true), node("kt-node-2", false)],
    });
    assert_eq!(
        h.render(),
        "---- Router (kt-system/kt-router, for --mode ebpf) ----\n\
         > kt-node-1: ready (pod kt-router-kt-node-1)\n\
         > kt-node-2: not ready (pod kt-router-kt-node-2)\n\
         kt-router is ready on 1 of 2 node(s); not ready on kt-node-2 (pod kt-router-kt-node-2)\n"
    );
    assert!(
        RouterView::Missing
            .render()
            .contains("> not installed (deploy/router.yaml)")
    );
    let json = serde_json::to_value(&h).unwrap();
    assert_eq!(json["state"], "installed");
    assert_eq!(json["nodes"][1]["ready"], false);
}
