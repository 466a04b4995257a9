//! The router issue's XDP question, measured rather than argued: the smallest XDP program there
//! is (`return XDP_PASS`, two instructions) attached to every veth of the nginx pod's node, and
//! the same client load as `cluster-service`. Whatever an XDP program of the router could save
//! on a pod's veth, it would first pay what merely having one attached costs that veth; this
//! path is that cost.
//!
//! aya loads programs only from ELF objects, so this two-instruction program is loaded and
//! linked with bpf(2) itself. The links are bpf_links held by this process: they detach when
//! dropped, or when the bench dies.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result, bail};

/// bpf(2) commands, program type and attach type (include/uapi/linux/bpf.h).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
/// XDP_FLAGS_DRV_MODE: native mode (the veth driver runs XDP itself), not the generic
/// fallback, as a real XDP program on a pod's veth would run.
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// `r0 = XDP_PASS (2); exit`, in eBPF's 8-byte instruction encoding.
const XDP_PASS_PROGRAM: [u64; 2] = [
    // BPF_ALU64 | BPF_MOV | BPF_K (0xb7), dst r0, imm 2
    0x0000_0002_0000_00b7,
    // BPF_JMP | BPF_EXIT (0x95)
    0x0000_0000_0000_0095,
];

/// The head of `union bpf_attr` for BPF_PROG_LOAD, up to `expected_attach_type`; the kernel
/// takes a shorter attr as zero beyond it.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The head of `union bpf_attr` for BPF_LINK_CREATE.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

/// bpf(2) returning a new descriptor.
fn bpf_fd<T>(cmd: libc::c_long, attr: &mut T, what: &str) -> Result<OwnedFd> {
    // SAFETY: `attr` is a live, initialised repr(C) head of union bpf_attr of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context(what.to_string());
    }
    // SAFETY: the kernel just returned this descriptor to us, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The XDP_PASS program, attached in native mode to veths of one network namespace; detached
/// when dropped.
pub(super) struct XdpPass {
    /// The veths, as `ip` names them in the node.
    pub(super) veths: Vec<String>,
    _links: Vec<OwnedFd>,
    _prog: OwnedFd,
}

impl XdpPass {
    /// Attaches to every veth in the network namespace `/run/netns/<netns>` (a testbed node:
    /// the host side of each of its pods).
    pub(super) fn attach_node(netns: &str) -> Result<XdpPass> {
        let out = std::process::Command::new("ip")
            .args(["-n", netns, "-o", "link", "show", "type", "veth"])
            .output()
            .context("running ip")?;
        if !out.status.success() {
            bail!(
                "ip -n {netns} link show: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let veths = veths(&String::from_utf8_lossy(&out.stdout));
        if veths.is_empty() {
            bail!("no veth in network namespace {netns}");
        }
        let prog = load()?;
        let path = kt_testbed::machine::netns_path(netns);
        let prog_fd = prog.as_raw_fd();
        let indexes: Vec<u32> = veths.iter().map(|(i, _)| *i).collect();
        // Interface indexes are the namespace's own: link from a thread that entered it (the
        // links stay the process's when the thread ends).
        let links = std::thread::spawn(move || -> Result<Vec<OwnedFd>> {
            let ns = std::fs::File::open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            // SAFETY: setns(2) on this thread only, with a descriptor we hold open.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("entering {}", path.display()));
            }
            indexes
                .iter()
                .map(|&ifindex| {
                    let mut attr = LinkCreateAttr {
                        prog_fd: prog_fd as u32,
                        target_ifindex: ifindex,
                        attach_type: BPF_XDP,
                        flags: XDP_FLAGS_DRV_MODE,
                    };
                    bpf_fd(
                        BPF_LINK_CREATE,
                        &mut attr,
                        &format!("attaching XDP to interface {ifindex}"),
                    )
                })
                .collect()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the XDP attach thread panicked"))??;
        Ok(XdpPass {
            veths: veths.into_iter().map(|(_, n)| n).collect(),
            _links: links,
            _prog: prog,
        })
    }
}

/// Loads the XDP_PASS program.
fn load() -> Result<OwnedFd> {
    let license = CString::new("GPL").expect("no NUL");
    let mut name = [0u8; 16];
    name[..7].copy_from_slice(b"kt_pass");
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: XDP_PASS_PROGRAM.len() as u32,
        insns: XDP_PASS_PROGRAM.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        ..ProgLoadAttr::default()
    };
    bpf_fd(
        BPF_PROG_LOAD,
        &mut attr,
        "loading an XDP_PASS program (needs CAP_BPF and CAP_NET_ADMIN)",
    )
}

/// The veths in `ip -o link show type veth` output: (interface index, name without `@peer`).
fn veths(ip_out: &str) -> Vec<(u32, String)> {
    ip_out
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let index = parts.next()?.trim().parse().ok()?;
            let name = parts.next()?.trim().split('@').next()?.to_string();
            (!name.is_empty()).then_some((index, name))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veths_are_read_from_ip_one_line_output() {
        let out = "\
7: kt3f2a9c1d@if2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP mode DEFAULT group default qlen 1000\\    link/ether 6a:1b:2c:3d:4e:5f brd ff:ff:ff:ff:ff:ff link-netns kt-pod-1
12: ktbb01@if2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP\\    link/ether 6a:1b:2c:3d:4e:60
garbage line
";
        assert_eq!(
            veths(out),
            [(7, "kt3f2a9c1d".to_string()), (12, "ktbb01".to_string())]
        );
        assert!(veths("").is_empty());
    }
}
