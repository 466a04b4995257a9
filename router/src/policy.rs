//! What the shadow may dial: only what the session routes.
//!
//! ktctl hands the shadow the cluster CIDRs it routes (plus `--includeIps`) and the ranges it
//! cut out of them (`--excludeIps`, the API server). A stream to anything else is refused with
//! [`ErrorCode::Denied`](kt_common::wire::ErrorCode::Denied): a session is a way into the
//! cluster's Services and pods, not a general-purpose proxy from inside the cluster. Whatever
//! the lists say, the pod's own loopback, the unspecified and multicast ranges and link-local
//! addresses (169.254.0.0/16: cloud metadata endpoints hand out node credentials there) are
//! never dialled.

use std::net::IpAddr;
use std::str::FromStr;

use ipnet::Ipv4Net;

/// The shadow's dial policy.
#[derive(Clone, Debug, Default)]
pub struct DialPolicy {
    allow: Vec<Ipv4Net>,
    except: Vec<Ipv4Net>,
}

impl DialPolicy {
    /// From `--routes` and `--except` (comma-separated IPv4 CIDRs).
    pub fn parse(routes: &str, except: &str) -> Result<DialPolicy, String> {
        let list = |flag: &str, s: &str| -> Result<Vec<Ipv4Net>, String> {
            s.split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| Ipv4Net::from_str(p).map_err(|e| format!("{flag}: {p:?}: {e}")))
                .collect()
        };
        Ok(DialPolicy {
            allow: list("--routes", routes)?,
            except: list("--except", except)?,
        })
    }

    /// Why `ip` may not be dialled, or `None` if it may.
    pub fn check(&self, ip: IpAddr) -> Option<&'static str> {
        let v4 = match ip {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4,
                None => return Some("IPv6 destinations are not routed by this session"),
            },
        };
        if v4.is_loopback() {
            return Some("the shadow's own loopback is never dialled");
        }
        if v4.is_link_local() {
            return Some("link-local addresses (cloud metadata) are never dialled");
        }
        if v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast() || v4.octets()[0] == 0 {
            return Some("not a unicast address");
        }
        if self.except.iter().any(|n| n.contains(&v4)) {
            return Some("excluded from this session's routes");
        }
        if !self.allow.iter().any(|n| n.contains(&v4)) {
            return Some("outside the cluster CIDRs this session routes");
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> DialPolicy {
        DialPolicy::parse(
            "10.96.0.0/16, 10.244.0.0/16,127.0.0.0/8,169.254.0.0/16",
            "10.96.0.1/32",
        )
        .expect("parses")
    }

    #[test]
    fn routed_cluster_addresses_may_be_dialled() {
        let p = policy();
        assert_eq!(p.check("10.96.3.4".parse().unwrap()), None);
        assert_eq!(p.check("10.244.1.2".parse().unwrap()), None);
        assert_eq!(p.check("::ffff:10.244.1.2".parse().unwrap()), None);
    }

    #[test]
    fn loopback_link_local_and_unrouted_addresses_are_refused_even_if_listed() {
        let p = policy();
        for ip in [
            "127.0.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "224.0.0.1",
            "8.8.8.8",
            "10.97.0.1",
            "::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(p.check(ip.parse().unwrap()).is_some(), "{ip} was allowed");
        }
    }

    #[test]
    fn the_api_server_cut_out_of_a_route_is_refused() {
        assert!(policy().check("10.96.0.1".parse().unwrap()).is_some());
    }

    #[test]
    fn an_empty_policy_refuses_everything_and_bad_cidrs_are_errors() {
        let p = DialPolicy::default();
        assert!(p.check("10.96.3.4".parse().unwrap()).is_some());
        assert!(DialPolicy::parse("10.96.0.0/33", "").is_err());
        assert!(DialPolicy::parse("", "nonsense").is_err());
    }
}
