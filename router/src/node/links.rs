//! The node's pod interfaces and their comings and goings.
//!
//! A pod interface is the host side of a pod's veth: an interface whose driver is `veth` and
//! which has no IPv4 address outside 169.254.0.0/16 (Calico-style gateways carry
//! 169.254.1.1; a node's own uplink, veth or not, carries the node's address). Bridge-based
//! CNIs fit too: their veths are bridge ports without addresses.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;

/// Interface index -> name, for every pod interface now.
pub fn pod_interfaces() -> io::Result<BTreeMap<u32, String>> {
    let addressed = addressed()?;
    let probe = socket(libc::AF_INET, libc::SOCK_DGRAM, 0)?;
    let mut out = BTreeMap::new();
    for (index, name) in interfaces()? {
        if !addressed.contains(&name) && driver(&probe, &name).as_deref() == Some("veth") {
            out.insert(index, name);
        }
    }
    Ok(out)
}

/// Every interface of this network namespace (if_nameindex asks the kernel over netlink;
/// /sys/class/net may show another namespace's, as it does in a container that bind-mounts
/// the host's /sys).
fn interfaces() -> io::Result<Vec<(u32, String)>> {
    // SAFETY: returns an array terminated by a zero entry, freed below.
    let head = unsafe { libc::if_nameindex() };
    if head.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    // SAFETY: entries up to the terminating one (index 0, NULL name) are valid.
    unsafe {
        while (*cur).if_index != 0 && !(*cur).if_name.is_null() {
            let name = CStr::from_ptr((*cur).if_name)
                .to_string_lossy()
                .into_owned();
            out.push(((*cur).if_index, name));
            cur = cur.add(1);
        }
        libc::if_freenameindex(head);
    }
    Ok(out)
}

/// Interfaces with an IPv4 address outside 169.254.0.0/16.
fn addressed() -> io::Result<BTreeSet<String>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = BTreeSet::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points at a sockaddr of the family it names.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        if family != libc::AF_INET {
            continue;
        }
        // SAFETY: an AF_INET address is a sockaddr_in.
        let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
        let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
        if !ip.is_link_local() {
            // SAFETY: ifa_name is a NUL-terminated string.
            let name = unsafe { CStr::from_ptr(ifa.ifa_name) };
            out.insert(name.to_string_lossy().into_owned());
        }
    }
    // SAFETY: the list getifaddrs returned.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// `struct ethtool_drvinfo` (linux/ethtool.h).
#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 3;

/// The interface's driver name (ethtool), if it has one.
fn driver(sock: &OwnedFd, name: &str) -> Option<String> {
    if name.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: plain integers and byte arrays; all-zero is valid.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    // SAFETY: as above.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
    // SAFETY: SIOCETHTOOL with a valid ifreq whose data points at a drvinfo that outlives the
    // call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, &mut req) } != 0 {
        return None;
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

fn socket(domain: i32, ty: i32, proto: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned at once.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Link changes on the node (rtnetlink's RTMGRP_LINK group): a pod's veth appearing or going.
pub struct LinkEvents(AsyncFd<OwnedFd>);

impl LinkEvents {
    pub fn open() -> io::Result<LinkEvents> {
        let fd = socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK,
            libc::NETLINK_ROUTE,
        )?;
        // SAFETY: all-zero is a valid sockaddr_nl.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = libc::RTMGRP_LINK as u32 | libc::RTMGRP_IPV4_IFADDR as u32;
        // SAFETY: binding our socket to a valid sockaddr_nl of the right size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: an OwnedFd, which keeps its descriptor open until the AsyncFd drops it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(LinkEvents(fd))
    }

    /// Waits for one or more link or address changes (their content does not matter: the
    /// caller looks at the interfaces again).
    pub async fn changed(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 8192];
        loop {
            let mut guard = self.0.readable().await?;
            let mut got = false;
            loop {
                // SAFETY: reading into our buffer from our socket.
                let n = unsafe {
                    libc::recv(
                        self.0.get_ref().as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                    )
                };
                if n > 0 {
                    got = true;
                    continue;
                }
                if n == 0 {
                    break;
                }
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    // Messages were dropped: something changed.
                    Some(libc::ENOBUFS) => got = true,
                    Some(libc::EINTR) => {}
                    _ => return Err(e),
                }
            }
            guard.clear_ready();
            if got {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_not_a_pod_interface_and_has_no_veth_driver() {
        let probe = socket(libc::AF_INET, libc::SOCK_DGRAM, 0).unwrap();
        assert_ne!(driver(&probe, "lo").as_deref(), Some("veth"));
        assert!(!pod_interfaces().unwrap().values().any(|n| n == "lo"));
    }
}
