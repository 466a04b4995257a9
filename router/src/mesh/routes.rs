//! The route table: which header value sends a request to which developer.
//!
//! Each developer's route is a ConfigMap labelled `kt.dev/mesh-of=<service>` ([`Route`]);
//! [`RouteBook`] folds the watch's events into the set of valid ones, and [`Routes`] is what the
//! proxy asks on every request.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::Ipv6Addr;
use std::sync::{Arc, PoisonError, RwLock};

use http::{HeaderMap, HeaderName, HeaderValue};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::watcher::Event;

/// The ConfigMap key holding the header name.
pub const KEY_HEADER: &str = "header";
/// The ConfigMap key holding the header value that selects the route.
pub const KEY_VALUE: &str = "value";
/// The ConfigMap key holding the host that matching requests go to.
pub const KEY_TARGET: &str = "target";

/// A host to forward to (a DNS name or an IP address), written as a URI authority writes it:
/// an IPv6 address in brackets. Cheap to clone: requests in flight keep theirs while the table
/// changes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Host(Arc<str>);

/// Not a host name or IP address.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a host name or IP address")]
pub struct BadHost(pub String);

impl Host {
    /// Checks `s` is a bare host: no port, path, user or scheme.
    pub fn parse(s: &str) -> Result<Host, BadHost> {
        let inner = s
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(s);
        if let Ok(v6) = inner.parse::<Ipv6Addr>() {
            return Ok(Host(format!("[{v6}]").into()));
        }
        let ok = !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if ok {
            Ok(Host(s.into()))
        } else {
            Err(BadHost(s.to_string()))
        }
    }
}

impl Host {
    /// An IP address as a host.
    pub fn ip(ip: std::net::IpAddr) -> Host {
        match ip {
            std::net::IpAddr::V4(v4) => Host(v4.to_string().into()),
            std::net::IpAddr::V6(v6) => Host(format!("[{v6}]").into()),
        }
    }

    /// The host without an IPv6 address's brackets, for name resolution.
    pub fn unbracketed(&self) -> &str {
        self.0
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(&self.0)
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One developer's route: requests whose `header` equals `value` go to `target`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub header: HeaderName,
    pub value: HeaderValue,
    pub target: Host,
    /// The ConfigMap it came from, for logs.
    pub configmap: String,
}

/// Why a route ConfigMap is ignored.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("no `{0}` key")]
    Missing(&'static str),
    #[error("`header` {0:?} is not an HTTP header name")]
    Header(String),
    #[error(
        "`value` {0:?} is not an HTTP header value (empty, control characters, or spaces at an end)"
    )]
    Value(String),
    #[error("`target` {0}")]
    Target(#[source] BadHost),
}

impl Route {
    /// The route a ConfigMap describes.
    pub fn from_configmap(cm: &ConfigMap) -> Result<Route, RouteError> {
        let get = |k: &'static str| {
            cm.data
                .as_ref()
                .and_then(|d| d.get(k))
                .ok_or(RouteError::Missing(k))
        };
        let (header, value, target) = (get(KEY_HEADER)?, get(KEY_VALUE)?, get(KEY_TARGET)?);
        Route::parse(
            header,
            value,
            target,
            cm.metadata.name.clone().unwrap_or_default(),
        )
    }

    /// A route from its parts (`source` names where it came from, for logs); `header` empty
    /// is a missing header.
    pub fn parse(
        header: &str,
        value: &str,
        target: &str,
        source: String,
    ) -> Result<Route, RouteError> {
        if header.is_empty() {
            return Err(RouteError::Missing(KEY_HEADER));
        }
        let header = HeaderName::from_bytes(header.trim().as_bytes())
            .map_err(|_| RouteError::Header(header.to_string()))?;
        // Parsers drop the spaces around a header's value: a value with spaces at an end (or
        // an empty one) could never match.
        let valid = !value.is_empty() && value.trim() == value;
        let value = HeaderValue::from_str(value)
            .ok()
            .filter(|_| valid)
            .ok_or_else(|| RouteError::Value(value.to_string()))?;
        let target = Host::parse(target.trim()).map_err(RouteError::Target)?;
        Ok(Route {
            header,
            value,
            target,
            configmap: source,
        })
    }

    fn matches(&self, headers: &HeaderMap) -> bool {
        headers
            .get_all(&self.header)
            .iter()
            .any(|v| v.as_bytes() == self.value.as_bytes())
    }
}

/// The routes in force, shared by the watch (which sets them) and every proxied request (which
/// asks them).
#[derive(Debug, Default)]
pub struct Routes {
    table: RwLock<Vec<Route>>,
}

impl Routes {
    /// Replaces the table. The first route that matches a request wins, so `routes` should be
    /// in a stable order.
    pub fn set(&self, routes: Vec<Route>) {
        *self.table.write().unwrap_or_else(PoisonError::into_inner) = routes;
    }

    /// Where a request with `headers` goes, if a route matches it (`None`: the default).
    /// Allocates nothing: header names are looked up by hash, values compared as bytes.
    pub fn pick(&self, headers: &HeaderMap) -> Option<Host> {
        let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
        table
            .iter()
            .find(|r| r.matches(headers))
            .map(|r| r.target.clone())
    }
}

/// Folds the watch's events into the set of valid routes, logging each route added or
/// removed and each invalid ConfigMap (once per version of it).
#[derive(Debug, Default)]
pub struct RouteBook {
    /// Valid routes by ConfigMap name.
    routes: BTreeMap<String, Route>,
    /// While the watch lists again: what it listed so far.
    relist: Option<BTreeMap<String, Route>>,
    /// Invalid ConfigMaps already warned about, with the resourceVersion warned about.
    warned: HashMap<String, Option<String>>,
    synced: bool,
}

impl RouteBook {
    /// Takes one event of the watch; returns whether the routes changed.
    pub fn apply(&mut self, event: Event<ConfigMap>) -> bool {
        match event {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(cm) => {
                if let Some(route) = self.parse(&cm) {
                    self.relist
                        .get_or_insert_with(BTreeMap::new)
                        .insert(route.configmap.clone(), route);
                }
                false
            }
            Event::InitDone => {
                self.synced = true;
                let listed = self.relist.take().unwrap_or_default();
                let old = std::mem::replace(&mut self.routes, listed);
                for (name, r) in &old {
                    if self.routes.get(name) != Some(r) {
                        log_removed(r);
                    }
                }
                for (name, r) in &self.routes {
                    if old.get(name) != Some(r) {
                        log_added(r);
                    }
                }
                old != self.routes
            }
            Event::Apply(cm) => {
                let name = cm.metadata.name.clone().unwrap_or_default();
                match self.parse(&cm) {
                    Some(route) => {
                        if self.routes.get(&name) == Some(&route) {
                            return false;
                        }
                        if let Some(old) = self.routes.insert(name, route.clone()) {
                            log_removed(&old);
                        }
                        log_added(&route);
                        true
                    }
                    None => self.remove(&name),
                }
            }
            Event::Delete(cm) => {
                let name = cm.metadata.name.unwrap_or_default();
                self.warned.remove(&name);
                self.remove(&name)
            }
        }
    }

    /// The valid routes, by ConfigMap name.
    pub fn routes(&self) -> Vec<Route> {
        self.routes.values().cloned().collect()
    }

    /// The number of valid routes.
    pub fn count(&self) -> usize {
        self.routes.len()
    }

    /// Whether the watch has listed the ConfigMaps once: before, "no routes" means "not known
    /// yet".
    pub fn synced(&self) -> bool {
        self.synced
    }

    fn remove(&mut self, name: &str) -> bool {
        match self.routes.remove(name) {
            Some(old) => {
                log_removed(&old);
                true
            }
            None => false,
        }
    }

    fn parse(&mut self, cm: &ConfigMap) -> Option<Route> {
        let name = cm.metadata.name.clone().unwrap_or_default();
        match Route::from_configmap(cm) {
            Ok(r) => {
                self.warned.remove(&name);
                Some(r)
            }
            Err(e) => {
                let version = cm.metadata.resource_version.clone();
                if self.warned.get(&name) != Some(&version) {
                    tracing::warn!(configmap = %name, error = %e, "ignoring an invalid route");
                    self.warned.insert(name, version);
                }
                None
            }
        }
    }
}

fn log_added(r: &Route) {
    tracing::info!(header = %r.header, value = ?r.value, target = %r.target, configmap = %r.configmap, "route added");
}

fn log_removed(r: &Route) {
    tracing::info!(header = %r.header, value = ?r.value, target = %r.target, configmap = %r.configmap, "route removed");
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn configmap(name: &str, data: &[(&str, &str)]) -> ConfigMap {
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some(name.to_string());
        cm.metadata.resource_version = Some("1".to_string());
        cm.data = Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        cm
    }

    pub(crate) fn route(header: &str, value: &str, target: &str) -> Route {
        Route::from_configmap(&configmap(
            &format!("{target}-route"),
            &[("header", header), ("value", value), ("target", target)],
        ))
        .expect("a valid route")
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn a_request_goes_to_the_route_whose_header_it_carries_in_any_case() {
        let routes = Routes::default();
        routes.set(vec![
            route("VERSION", "abcde", "alice"),
            route("x-dev", "bob", "bob.default.svc"),
        ]);
        let pick = |h: &[(&str, &str)]| routes.pick(&headers(h)).map(|h| h.to_string());
        assert_eq!(pick(&[("version", "abcde")]).as_deref(), Some("alice"));
        assert_eq!(pick(&[("VeRsIoN", "abcde")]).as_deref(), Some("alice"));
        assert_eq!(
            pick(&[("X-Dev", "bob")]).as_deref(),
            Some("bob.default.svc"),
            "each route's header name is checked"
        );
        assert_eq!(pick(&[("version", "ABCDE")]), None, "values are exact");
        assert_eq!(pick(&[("version", "abcdef")]), None);
        assert_eq!(pick(&[]), None);
        assert_eq!(
            pick(&[("version", "zzz"), ("version", "abcde")]).as_deref(),
            Some("alice"),
            "any of a repeated header counts"
        );
    }

    #[test]
    fn hosts_are_bare_names_or_addresses() {
        for ok in [
            "nginx-kt-mesh-abcde.default.svc.cluster.local",
            "10.244.1.7",
            "localhost",
        ] {
            assert_eq!(Host::parse(ok).expect(ok).to_string(), ok);
        }
        assert_eq!(Host::parse("fd00::7").expect("v6").to_string(), "[fd00::7]");
        assert_eq!(
            Host::parse("[fd00::7]").expect("v6").to_string(),
            "[fd00::7]"
        );
        for bad in ["", "a:80", "a/b", "user@a", "http://a", "a b"] {
            assert!(Host::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn invalid_route_configmaps_are_ignored_and_valid_ones_kept() {
        let full = |n: &str, h: &str, v: &str, t: &str| {
            configmap(n, &[("header", h), ("value", v), ("target", t)])
        };
        let listed = [
            full("good", "VERSION", "abcde", "10.244.1.7"),
            configmap("no-target", &[("header", "VERSION"), ("value", "x")]),
            configmap("no-header", &[("value", "x"), ("target", "a")]),
            configmap("no-value", &[("header", "VERSION"), ("target", "a")]),
            full("bad-header", "VER SION", "x", "a"),
            full("bad-value", "VERSION", "a\nb", "a"),
            full("empty-value", "VERSION", "", "a"),
            full("spaced-value", "VERSION", " x", "a"),
            full("bad-target", "VERSION", "y", "a/b"),
            full("target-with-port", "VERSION", "z", "a:8080"),
            ConfigMap::default(),
        ];
        let mut book = RouteBook::default();
        assert!(!book.apply(Event::Init));
        for cm in listed {
            book.apply(Event::InitApply(cm));
        }
        assert!(!book.synced(), "not before the list is done");
        assert!(book.apply(Event::InitDone));
        assert!(book.synced());
        let names: Vec<_> = book.routes().into_iter().map(|r| r.configmap).collect();
        assert_eq!(names, ["good"]);

        // A route that turns invalid is removed; a deleted one too.
        assert!(book.apply(Event::Apply(full("b", "x-dev", "bob", "bob"))));
        assert!(
            !book.apply(Event::Apply(full("b", "x-dev", "bob", "bob"))),
            "no change"
        );
        assert!(book.apply(Event::Apply(full("good", "VERSION", "", "a"))));
        assert!(book.apply(Event::Delete(configmap("b", &[]))));
        assert!(book.routes().is_empty());
    }

    #[test]
    fn a_relist_replaces_the_routes_only_once_it_is_complete() {
        let mut book = RouteBook::default();
        let cm = |n: &str| configmap(n, &[("header", "v"), ("value", n), ("target", n)]);
        book.apply(Event::Init);
        book.apply(Event::InitApply(cm("a")));
        book.apply(Event::InitDone);
        // The watch restarts: "a" went away meanwhile, "b" came.
        book.apply(Event::Init);
        book.apply(Event::InitApply(cm("b")));
        let names: Vec<_> = book.routes().into_iter().map(|r| r.configmap).collect();
        assert_eq!(names, ["a"], "served until the list is done");
        assert!(book.apply(Event::InitDone));
        let names: Vec<_> = book.routes().into_iter().map(|r| r.configmap).collect();
        assert_eq!(names, ["b"]);
    }
}
