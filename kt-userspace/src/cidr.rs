//! Which addresses are the cluster's, and where each CIDR lives in the alias space.
//!
//! Every cluster CIDR gets a block of 127.128.0.0/9 of its own size, aligned to that size, so
//! that an address and its alias differ by a constant offset (see `kt_common::bpf`). Blocks
//! are handed out largest first, which keeps every block aligned without gaps.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use kt_common::bpf::{ALIAS_NET, ALIAS_PREFIX, ALIAS_SIZE};

/// One cluster CIDR and its alias block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub net: Ipv4Net,
    pub alias: Ipv4Net,
}

/// The redirect plan: cluster CIDRs with their alias blocks, and the holes cut into them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub routes: Vec<Route>,
    pub excluded: Vec<Ipv4Net>,
}

/// Why the CIDRs cannot be planned.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error(
        "{net} is wider than the alias space (a /{ALIAS_PREFIX}); narrow it with --includeIps/--excludeIps"
    )]
    TooWide { net: Ipv4Net },
    #[error(
        "the cluster CIDRs span {total} addresses, more than the {ALIAS_SIZE} ktctl can alias; narrow them with --excludeIps"
    )]
    Full { total: u64 },
    #[error("no cluster CIDR to redirect (every one is excluded)")]
    Empty,
}

/// Drops CIDRs contained in others and merges duplicates.
pub fn normalise(mut nets: Vec<Ipv4Net>) -> Vec<Ipv4Net> {
    nets = nets.into_iter().map(|n| n.trunc()).collect();
    nets.sort_by_key(|n| (n.prefix_len(), n.network()));
    nets.dedup();
    let mut out: Vec<Ipv4Net> = Vec::new();
    for n in nets {
        if !out.iter().any(|o| o.contains(&n)) {
            out.push(n);
        }
    }
    out.sort_by_key(|n| (n.network(), n.prefix_len()));
    out
}

impl Plan {
    /// Plans `include` minus `exclude`. An include wholly inside an exclude is dropped; an
    /// exclude inside an include becomes a hole.
    pub fn new(include: &[Ipv4Net], exclude: &[Ipv4Net]) -> Result<Plan, PlanError> {
        let exclude = normalise(exclude.to_vec());
        let mut include: Vec<Ipv4Net> = normalise(include.to_vec())
            .into_iter()
            .filter(|n| !exclude.iter().any(|e| e.contains(n)))
            .collect();
        if include.is_empty() {
            return Err(PlanError::Empty);
        }
        include.sort_by_key(|n| (n.prefix_len(), n.network()));
        let total: u64 = include.iter().map(|n| 1u64 << (32 - n.prefix_len())).sum();
        if let Some(n) = include
            .iter()
            .find(|n| u32::from(n.prefix_len()) < ALIAS_PREFIX)
        {
            return Err(PlanError::TooWide { net: *n });
        }
        if total > ALIAS_SIZE {
            return Err(PlanError::Full { total });
        }
        let mut offset = 0u32;
        let routes: Vec<Route> = include
            .into_iter()
            .map(|net| {
                let alias = Ipv4Net::new(Ipv4Addr::from(ALIAS_NET + offset), net.prefix_len())
                    .expect("valid prefix");
                offset += 1u32 << (32 - net.prefix_len());
                Route { net, alias }
            })
            .collect();
        let excluded = exclude
            .into_iter()
            .filter(|e| include_contains(&routes, e))
            .collect();
        Ok(Plan { routes, excluded })
    }

    /// The alias of a cluster address (None if it is not one, or is excluded).
    pub fn alias_of(&self, ip: Ipv4Addr) -> Option<Ipv4Addr> {
        if self.excluded.iter().any(|e| e.contains(&ip)) {
            return None;
        }
        let r = self.routes.iter().find(|r| r.net.contains(&ip))?;
        Some(Ipv4Addr::from(
            u32::from(r.alias.network()) + (u32::from(ip) - u32::from(r.net.network())),
        ))
    }

    /// The cluster address behind an alias.
    pub fn original_of(&self, alias: Ipv4Addr) -> Option<Ipv4Addr> {
        let r = self.routes.iter().find(|r| r.alias.contains(&alias))?;
        Some(Ipv4Addr::from(
            u32::from(r.net.network()) + (u32::from(alias) - u32::from(r.alias.network())),
        ))
    }

    /// Whether an address is redirected.
    pub fn is_cluster(&self, ip: Ipv4Addr) -> bool {
        self.alias_of(ip).is_some()
    }
}

fn include_contains(routes: &[Route], e: &Ipv4Net) -> bool {
    routes.iter().any(|r| r.net.contains(e))
}

/// Whether `net` overlaps loopback (127.0.0.0/8): the machine's own services, ktctl's alias
/// space (127.128.0.0/9) and its DNS servers (127.127.53.0/24). Such addresses cannot be sent
/// through the cluster.
pub fn overlaps_loopback(net: &Ipv4Net) -> bool {
    let loopback = Ipv4Net::new(Ipv4Addr::new(127, 0, 0, 0), 8).expect("8 is a valid prefix");
    loopback.contains(net) || net.contains(&loopback)
}

/// The /16 around an address: kt-connect's guess when the cluster does not say its CIDRs.
pub fn widen16(ip: Ipv4Addr) -> Ipv4Net {
    Ipv4Net::new(ip, 16).expect("16 is a valid prefix").trunc()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_are_aligned_and_largest_first() {
        let p = Plan::new(
            &[n("10.244.1.0/24"), n("10.96.0.0/16"), n("10.244.2.0/24")],
            &[],
        )
        .unwrap();
        assert_eq!(
            p.routes,
            vec![
                Route {
                    net: n("10.96.0.0/16"),
                    alias: n("127.128.0.0/16")
                },
                Route {
                    net: n("10.244.1.0/24"),
                    alias: n("127.129.0.0/24")
                },
                Route {
                    net: n("10.244.2.0/24"),
                    alias: n("127.129.1.0/24")
                },
            ]
        );
        for r in &p.routes {
            assert_eq!(
                r.alias.network(),
                r.alias.trunc().network(),
                "{r:?} unaligned"
            );
        }
    }

    #[test]
    fn aliases_round_trip() {
        let p = Plan::new(&[n("10.96.0.0/16"), n("10.244.0.0/16")], &[]).unwrap();
        for a in ["10.96.0.1", "10.96.255.254", "10.244.1.5"] {
            let alias = p.alias_of(ip(a)).unwrap();
            assert!(kt_common::bpf::is_alias(u32::from(alias)));
            assert_eq!(p.original_of(alias), Some(ip(a)));
        }
        assert_eq!(p.alias_of(ip("192.168.50.11")), None);
        assert_eq!(p.original_of(ip("127.0.0.1")), None);
    }

    #[test]
    fn contained_and_duplicate_cidrs_collapse() {
        assert_eq!(
            normalise(vec![
                n("10.244.1.0/24"),
                n("10.244.0.0/16"),
                n("10.244.0.0/16"),
                n("10.96.0.5/16")
            ]),
            vec![n("10.96.0.0/16"), n("10.244.0.0/16")]
        );
    }

    #[test]
    fn excludes_cut_holes_or_drop_whole_cidrs() {
        let p = Plan::new(
            &[n("10.96.0.0/16"), n("172.20.0.0/16")],
            &[n("10.96.5.0/24"), n("172.16.0.0/12")],
        )
        .unwrap();
        assert_eq!(p.routes.len(), 1);
        assert_eq!(p.excluded, vec![n("10.96.5.0/24")]);
        assert_eq!(p.alias_of(ip("10.96.5.7")), None);
        assert!(p.alias_of(ip("10.96.6.7")).is_some());
        assert_eq!(p.alias_of(ip("172.20.0.1")), None);
    }

    #[test]
    fn loopback_and_the_alias_space_are_recognised() {
        for net in [
            "127.0.0.1/32",
            "127.0.0.0/8",
            "127.128.0.0/16",
            "127.127.53.1/32",
            "0.0.0.0/0",
            "120.0.0.0/5",
        ] {
            assert!(overlaps_loopback(&n(net)), "{net}");
        }
        for net in ["10.96.0.0/16", "126.255.255.255/32", "128.0.0.0/8"] {
            assert!(!overlaps_loopback(&n(net)), "{net}");
        }
        let alias_space = Ipv4Net::new(Ipv4Addr::from(ALIAS_NET), ALIAS_PREFIX as u8).unwrap();
        assert!(overlaps_loopback(&alias_space));
        let dns = Ipv4Addr::from(kt_common::bpf::DNS_ALIAS_NET + 1);
        assert!(overlaps_loopback(&Ipv4Net::from(dns)));
    }

    #[test]
    fn too_much_is_a_clear_error() {
        assert_eq!(
            Plan::new(&[n("10.0.0.0/8")], &[]),
            Err(PlanError::TooWide {
                net: n("10.0.0.0/8")
            })
        );
        assert_eq!(
            Plan::new(&[n("10.0.0.0/9"), n("11.0.0.0/16")], &[]),
            Err(PlanError::Full {
                total: (1 << 23) + (1 << 16)
            })
        );
        assert_eq!(
            Plan::new(&[n("10.96.0.0/16")], &[n("10.0.0.0/8")]),
            Err(PlanError::Empty)
        );
        assert!(Plan::new(&[n("10.0.0.0/9")], &[]).is_ok());
    }
}
