//! `ktctl preview <name>`: a local service appears in the cluster as the Service `<name>`,
//! selecting a shadow whose listeners reach the local ports. `--external` makes it a
//! LoadBalancer. The Service belongs to the session: it goes when the session ends, however it
//! ends (garbage collection follows the session's anchor).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Api;

use super::Signals;
use super::inbound;
use crate::cli::{Global, PreviewArgs};
use crate::cluster::session::{Kind, ROLE_LABEL, SESSION_LABEL};
use crate::cluster::{CONNECT_PERMISSIONS, ClusterError};
use crate::error::{EnvError, Error, Result};
use crate::interrupt::Interrupts;

const ROLE: &str = "shadow-preview";

pub async fn run(global: &Global, args: &PreviewArgs) -> Result<u8> {
    let name = &args.name;
    if !inbound::is_dns_name(name) || name.len() > 63 || name.contains('.') {
        return Err(EnvError::new(format!(
            "{name:?} is not a valid Service name (a lowercase DNS label of at most 63 characters)"
        ))
        .into());
    }
    let expose = &args.expose.expose;
    let kube = super::connect_kube(global).await?;
    kube.require(CONNECT_PERMISSIONS).await?;
    kube.require_from(inbound::INBOUND_PERMISSIONS, "deploy/rbac-inbound.yaml")
        .await?;
    let api = Api::<Service>::namespaced(kube.client.clone(), &kube.namespace);
    if api
        .get_opt(name)
        .await
        .map_err(|e| ClusterError::api(format!("reading service {name}"), e))?
        .is_some()
    {
        return Err(EnvError::new(format!(
            "service '{name}' already exists in namespace {}; preview under another name, or exchange it",
            kube.namespace
        ))
        .into());
    }
    inbound::check_local_ports(expose, args.expose.skip_port_checking).await?;
    inbound::clean_dead(&kube, args.session.skip_cleanup).await?;
    let mut opts = super::shadow_options(global)?;
    opts.ports = inbound::remote_ports(expose);
    opts.name = Some(format!("{name}-kt-{{id}}"));
    let interrupts =
        Interrupts::install("preview").map_err(|e| Error::io("handling signals", e))?;
    let mark = interrupts.count();
    super::with_shadow(
        &kube,
        &opts,
        "preview",
        Duration::from_secs(args.session.grace),
        Duration::from_secs(global.port_forward_timeout),
        &interrupts,
        Signals::Body,
        async |session, tunnel| {
            inbound::expose_all(tunnel, expose).await?;
            let svc = Service {
                metadata: session.meta(name, "preview"),
                spec: Some(ServiceSpec {
                    selector: Some(BTreeMap::from([
                        (SESSION_LABEL.to_string(), session.id.clone()),
                        (ROLE_LABEL.to_string(), ROLE.to_string()),
                    ])),
                    ports: Some(
                        expose
                            .0
                            .iter()
                            .map(|m| ServicePort {
                                name: Some(format!("port-{}", m.remote)),
                                port: i32::from(m.remote),
                                target_port: Some(IntOrString::Int(i32::from(m.remote))),
                                protocol: Some("TCP".into()),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                    type_: Some(
                        if args.external {
                            "LoadBalancer"
                        } else {
                            "ClusterIP"
                        }
                        .into(),
                    ),
                    ..Default::default()
                }),
                ..Default::default()
            };
            session.create(Kind::Service, &svc).await?;
            tracing::info!("Service '{name}' created");
            inbound::banner(&format!(
                "Now you can access your local service in cluster by name '{name}'"
            ));
            inbound::ended(inbound::until_interrupted(&interrupts, mark).await)
        },
    )
    .await
}
