//! The local proxy: the sockets the sk_lookup program hands every alias to. Each accepted
//! connection or datagram flow learns its original destination from the alias it was sent to
//! (getsockname / IP_ORIGDSTADDR) and becomes a stream through the tunnel.

pub mod tcp;
pub mod udp;

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use kt_common::tunnel::{MuxStream, TunnelError};

use crate::cidr::Plan;
use crate::tunnel::Tunnel;

/// Opens streams through the tunnel: the seam in front of it, which unit tests fake with an
/// in-memory multiplexer.
pub trait Streams: Clone + Send + Sync + 'static {
    /// A new stream, without its Open frame (callers pipeline it with their data).
    fn open(&self) -> impl Future<Output = Result<MuxStream, TunnelError>> + Send;
}

impl Streams for Tunnel {
    fn open(&self) -> impl Future<Output = Result<MuxStream, TunnelError>> + Send {
        self.stream()
    }
}

/// Maps the alias a socket saw back to the cluster address it stands for.
#[derive(Clone, Debug)]
pub struct OrigDst {
    plan: Arc<Plan>,
}

impl OrigDst {
    pub fn new(plan: Arc<Plan>) -> OrigDst {
        OrigDst { plan }
    }

    /// The original destination of something sent to `alias`.
    pub fn resolve(&self, alias: SocketAddr) -> Option<SocketAddr> {
        let v4 = match alias {
            SocketAddr::V4(a) => *a.ip(),
            SocketAddr::V6(a) => a.ip().to_ipv4_mapped()?,
        };
        let orig: Ipv4Addr = self.plan.original_of(v4)?;
        Some(SocketAddr::V4(SocketAddrV4::new(orig, alias.port())))
    }
}
