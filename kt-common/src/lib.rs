//! Types shared by ktctl's eBPF programs, its userspace and its in-cluster agent.
//!
//! Layout:
//! - [`bpf`]: keys, values and constants of the BPF maps (`no_std`, `#[repr(C)]`; the `user`
//!   feature adds `aya::Pod` impls);
//! - [`wire`] (feature `std`): the tunnel's frames and their codec;
//! - [`dnsmsg`] (feature `std`): whether a DNS reply answers a query (header and question);
//! - [`tunnel`] (feature `tunnel`): the session both ends run over those frames: TLS 1.3 with
//!   mutual authentication, yamux multiplexing, the versioned handshake and keepalive;
//! - [`pki`] (feature `pki`): a session's CA and certificates;
//! - [`changes`] (feature `changes`): what ktctl changed in users' objects, recorded on them.
#![no_std]
#![warn(missing_docs)]

#[cfg(feature = "std")]
extern crate std;

pub mod bpf;
pub mod steer;

#[cfg(feature = "std")]
pub mod wire;

#[cfg(feature = "std")]
pub mod dnsmsg;

#[cfg(feature = "tunnel")]
pub mod tunnel;

#[cfg(feature = "pki")]
pub mod pki;

#[cfg(feature = "changes")]
pub mod changes;
