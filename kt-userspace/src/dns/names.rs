//! Which names are the cluster's, as kt-connect's shadow DNS reads them.
//!
//! With cluster domain `cluster.local`, connect namespace `default` and host search domain
//! `lan`:
//! - `nginx`, `nginx.default`, `nginx.default.svc`, `nginx.default.svc.cluster.local`: the
//!   Service `default/nginx`;
//! - `web-0.nginx.default.svc.cluster.local`: the pod with hostname `web-0` behind it;
//! - any other name under `cluster.local` (pod A records, SRV): the cluster's DNS answers it;
//! - `nginx.lan` (a short name with the host's search suffix, as a resolver tries it first):
//!   read without the suffix;
//! - everything else: the upstream resolver.

/// How a query name is to be answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Name {
    /// A Service (answered from the watch).
    Service { name: String, namespace: String },
    /// A pod behind a (headless) Service, by hostname.
    Endpoint {
        hostname: String,
        service: String,
        namespace: String,
    },
    /// Some other name in the cluster domain: ask the cluster's DNS (through the shadow).
    Cluster { fqdn: String },
    /// Not the cluster's.
    Upstream,
}

/// What the rules need to know.
#[derive(Clone, Debug)]
pub struct Rules {
    pub cluster_domain: String,
    pub namespace: String,
    pub host_search: Vec<String>,
    /// `--dnsMode podDNS`: names that are not the cluster's are asked of the cluster's DNS too,
    /// not of this machine's resolvers.
    pub pod_dns: bool,
}

fn is_label(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

impl Rules {
    /// Classifies a query name (case-insensitive, with or without the root dot).
    /// `is_namespace` says whether a label names a namespace of the cluster.
    pub fn classify(&self, qname: &str, is_namespace: impl Fn(&str) -> bool) -> Name {
        let q = qname.trim_end_matches('.').to_ascii_lowercase();
        let domain = self.cluster_domain.trim_matches('.').to_ascii_lowercase();
        if let Some(rest) = q.strip_suffix(&domain).and_then(|r| r.strip_suffix('.')) {
            let labels: Vec<&str> = rest.split('.').collect();
            return match labels.as_slice() {
                [svc, ns, "svc"] if is_label(svc) && is_label(ns) => Name::Service {
                    name: svc.to_string(),
                    namespace: ns.to_string(),
                },
                [host, svc, ns, "svc"] if is_label(host) && is_label(svc) && is_label(ns) => {
                    Name::Endpoint {
                        hostname: host.to_string(),
                        service: svc.to_string(),
                        namespace: ns.to_string(),
                    }
                }
                _ => Name::Cluster {
                    fqdn: format!("{q}."),
                },
            };
        }
        if q == domain {
            return Name::Cluster {
                fqdn: format!("{q}."),
            };
        }
        if let Some(n) = self.short(&q, &is_namespace) {
            return n;
        }
        for suffix in &self.host_search {
            let suffix = suffix.trim_matches('.').to_ascii_lowercase();
            if suffix.is_empty() || suffix == domain {
                continue;
            }
            if let Some(rest) = q.strip_suffix(&suffix).and_then(|r| r.strip_suffix('.'))
                && let Some(n) = self.short(rest, &is_namespace)
            {
                return n;
            }
        }
        Name::Upstream
    }

    /// `svc`, `svc.ns`, `svc.ns.svc`, `host.svc.ns.svc`.
    fn short(&self, q: &str, is_namespace: &impl Fn(&str) -> bool) -> Option<Name> {
        let labels: Vec<&str> = q.split('.').collect();
        if !labels.iter().all(|l| is_label(l)) {
            return None;
        }
        match labels.as_slice() {
            [svc] => Some(Name::Service {
                name: svc.to_string(),
                namespace: self.namespace.clone(),
            }),
            [svc, ns] if is_namespace(ns) => Some(Name::Service {
                name: svc.to_string(),
                namespace: ns.to_string(),
            }),
            [svc, ns, "svc"] => Some(Name::Service {
                name: svc.to_string(),
                namespace: ns.to_string(),
            }),
            [host, svc, ns, "svc"] => Some(Name::Endpoint {
                hostname: host.to_string(),
                service: svc.to_string(),
                namespace: ns.to_string(),
            }),
            _ => None,
        }
    }

    /// The cluster FQDN of a Service.
    pub fn service_fqdn(&self, name: &str, namespace: &str) -> String {
        format!(
            "{name}.{namespace}.svc.{}.",
            self.cluster_domain.trim_matches('.')
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            cluster_domain: "cluster.local".into(),
            namespace: "default".into(),
            host_search: vec!["lan".into(), "corp.example.com".into()],
            pod_dns: false,
        }
    }

    fn ns(n: &str) -> bool {
        ["default", "kube-system", "other"].contains(&n)
    }

    fn svc(name: &str, namespace: &str) -> Name {
        Name::Service {
            name: name.into(),
            namespace: namespace.into(),
        }
    }

    #[test]
    fn every_service_spelling_kt_connect_users_type() {
        let r = rules();
        for q in [
            "nginx",
            "nginx.",
            "NGINX",
            "nginx.default",
            "nginx.default.svc",
            "nginx.default.svc.cluster.local",
            "nginx.default.svc.cluster.local.",
        ] {
            assert_eq!(r.classify(q, ns), svc("nginx", "default"), "{q}");
        }
        assert_eq!(r.classify("redis.other", ns), svc("redis", "other"));
        assert_eq!(
            r.classify("kube-dns.kube-system.svc.cluster.local", ns),
            svc("kube-dns", "kube-system")
        );
    }

    #[test]
    fn host_search_suffixes_are_read_through() {
        let r = rules();
        assert_eq!(r.classify("nginx.lan", ns), svc("nginx", "default"));
        assert_eq!(r.classify("nginx.default.lan", ns), svc("nginx", "default"));
        assert_eq!(
            r.classify("nginx.corp.example.com", ns),
            svc("nginx", "default")
        );
        assert_eq!(r.classify("printer.home.lan", ns), Name::Upstream);
    }

    #[test]
    fn endpoints_and_other_cluster_names() {
        let r = rules();
        assert_eq!(
            r.classify("web-0.nginx.default.svc.cluster.local", ns),
            Name::Endpoint {
                hostname: "web-0".into(),
                service: "nginx".into(),
                namespace: "default".into()
            }
        );
        assert_eq!(
            r.classify("10-244-1-5.default.pod.cluster.local", ns),
            Name::Cluster {
                fqdn: "10-244-1-5.default.pod.cluster.local.".into()
            }
        );
        assert_eq!(
            r.classify("_http._tcp.nginx.default.svc.cluster.local", ns),
            Name::Cluster {
                fqdn: "_http._tcp.nginx.default.svc.cluster.local.".into()
            }
        );
    }

    #[test]
    fn ordinary_names_go_upstream() {
        let r = rules();
        for q in [
            "home.test",
            "example.com",
            "www.example.com",
            "nginx.nosuchns",
            "a.b.c.d.e",
            "under_score",
            "",
        ] {
            assert_eq!(r.classify(q, ns), Name::Upstream, "{q:?}");
        }
    }

    #[test]
    fn another_cluster_domain() {
        let r = Rules {
            cluster_domain: "k8s.internal".into(),
            ..rules()
        };
        assert_eq!(
            r.classify("nginx.default.svc.k8s.internal", ns),
            svc("nginx", "default")
        );
        assert_eq!(
            r.classify("nginx.default.svc.cluster.local", ns),
            Name::Upstream
        );
        assert_eq!(r.service_fqdn("a", "b"), "a.b.svc.k8s.internal.");
    }
}
