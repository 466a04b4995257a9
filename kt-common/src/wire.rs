//! The tunnel's frames.
//!
//! A frame is a big-endian `u32` length followed by that many bytes: a one-byte tag and the
//! tag's fields. Lengths are bounded ([`MAX_FRAME`]); strings are `u16` length + UTF-8;
//! socket addresses are a family byte (4 or 6), the address and a big-endian port. Decoding
//! checks every length and never panics: a bad frame is a [`WireError`] that closes only the
//! stream it arrived on.
//!
//! Every multiplexed stream starts with one request frame and one reply frame:
//! - the first stream of a connection is the control stream: [`Frame::Hello`] →
//!   [`Frame::Welcome`] or [`Frame::Reject`], then [`Frame::Ping`]/[`Frame::Pong`];
//! - every other stream: [`Frame::Open`] → [`Frame::Reply`], then the payload: raw bytes for
//!   TCP, one frame per datagram for UDP, one frame each way for DNS.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::string::String;
use std::vec::Vec;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The protocol version this build speaks (the newest).
pub const PROTOCOL_VERSION: u16 = 1;
/// The oldest version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// Largest frame body (a UDP datagram or a DNS message over TCP, plus the tag).
pub const MAX_FRAME: usize = 65_536 + 64;
/// Largest control or open frame; anything larger is an error before it is read.
pub const MAX_CONTROL_FRAME: usize = 4_096;
/// Tag of [`Frame::Data`] (writers that frame a payload in place need it).
pub const DATA_TAG: u8 = 18;
/// Magic that opens a Hello, so that a stray connection is told apart from a client.
pub const MAGIC: [u8; 4] = *b"KTUN";

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// The frame ended before a field did.
    #[error("frame truncated: {0} needs more bytes")]
    Truncated(&'static str),
    /// The declared length is over the limit.
    #[error("frame of {len} bytes is over the limit of {max}")]
    TooLong {
        /// Declared length.
        len: usize,
        /// Limit that applied.
        max: usize,
    },
    /// Unknown frame tag.
    #[error("unknown frame tag {0}")]
    UnknownTag(u8),
    /// Unknown value in an enumerated field.
    #[error("bad {field}: {value}")]
    BadValue {
        /// The field.
        field: &'static str,
        /// The value found.
        value: u32,
    },
    /// A string is not UTF-8.
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
    /// Bytes left after the last field.
    #[error("{0} trailing bytes after the frame's fields")]
    Trailing(usize),
    /// A Hello without the magic: not a ktctl client.
    #[error("not a ktctl tunnel (bad magic)")]
    BadMagic,
}

/// What a stream is opened for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Open {
    /// Connect to a TCP address in the cluster; then raw bytes both ways.
    Tcp(SocketAddr),
    /// Exchange datagrams with a UDP address in the cluster; then one frame per datagram.
    Udp(SocketAddr),
    /// One DNS query to the cluster's DNS (the shadow's resolver): one frame each way.
    Dns,
    /// Ask the shadow to hand the connections it accepts on `port` (listening first if it
    /// does not yet) to this tunnel connection, each as an [`Open::Inbound`] stream, for as
    /// long as this stream stays open. The listener itself lives for the whole session.
    Expose {
        /// Port in the pod.
        port: u16,
    },
    /// (Shadow to client) a connection accepted on an exposed port; then raw bytes.
    Inbound {
        /// The exposed port it arrived on.
        port: u16,
        /// Who connected.
        peer: SocketAddr,
    },
    /// Echo every byte back (for `ktctl diagnose` and tests).
    Echo,
    /// Send `bytes` zero bytes, then close (throughput to the client).
    Source {
        /// How many bytes.
        bytes: u64,
    },
    /// Read and discard everything, then reply with the count as 8 bytes (throughput from the client).
    Sink,
}

/// Why an open failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ErrorCode {
    /// The target refused the connection.
    Refused = 1,
    /// No route to the target.
    Unreachable = 2,
    /// The target did not answer in time.
    TimedOut = 3,
    /// The agent may not do this.
    Denied = 4,
    /// The agent does not know this request.
    Unsupported = 5,
    /// The request was malformed.
    BadRequest = 6,
    /// Anything else.
    Internal = 7,
}

impl ErrorCode {
    fn from_u8(v: u8) -> Result<ErrorCode, WireError> {
        Ok(match v {
            1 => ErrorCode::Refused,
            2 => ErrorCode::Unreachable,
            3 => ErrorCode::TimedOut,
            4 => ErrorCode::Denied,
            5 => ErrorCode::Unsupported,
            6 => ErrorCode::BadRequest,
            7 => ErrorCode::Internal,
            v => {
                return Err(WireError::BadValue {
                    field: "error code",
                    value: u32::from(v),
                });
            }
        })
    }

    /// The error code for an I/O error of a dial.
    pub fn from_io(e: &std::io::Error) -> ErrorCode {
        use std::io::ErrorKind::*;
        match e.kind() {
            ConnectionRefused | ConnectionReset => ErrorCode::Refused,
            HostUnreachable | NetworkUnreachable | AddrNotAvailable => ErrorCode::Unreachable,
            TimedOut => ErrorCode::TimedOut,
            PermissionDenied => ErrorCode::Denied,
            _ => ErrorCode::Internal,
        }
    }
}

/// Every frame of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Client's first frame on the control stream.
    Hello {
        /// Newest version the client speaks.
        version: u16,
        /// Oldest version the client speaks.
        min_version: u16,
        /// Session id the client believes it belongs to.
        session: String,
        /// Free text naming the client (ktctl version, host).
        client: String,
    },
    /// Agent's answer to an acceptable Hello.
    Welcome {
        /// Version both ends now speak.
        version: u16,
        /// Free text naming the agent.
        agent: String,
        /// The pod's IP.
        pod_ip: Option<IpAddr>,
        /// The resolver the agent uses for [`Open::Dns`] (the cluster DNS).
        dns: Option<SocketAddr>,
    },
    /// Agent's answer to an unacceptable Hello; the connection closes.
    Reject {
        /// Why.
        reason: String,
    },
    /// Keepalive and round-trip measurement.
    Ping {
        /// Echoed in the Pong.
        nonce: u64,
    },
    /// Answer to a Ping.
    Pong {
        /// The Ping's nonce.
        nonce: u64,
    },
    /// First frame of a data stream.
    Open(Open),
    /// Answer to an Open: `None` is success.
    Reply(Option<(ErrorCode, String)>),
    /// A datagram or DNS message.
    Data(Bytes),
}

mod tag {
    pub const HELLO: u8 = 1;
    pub const WELCOME: u8 = 2;
    pub const REJECT: u8 = 3;
    pub const PING: u8 = 4;
    pub const PONG: u8 = 5;
    pub const OPEN: u8 = 16;
    pub const REPLY: u8 = 17;
    pub const DATA: u8 = super::DATA_TAG;
}

mod open_kind {
    pub const TCP: u8 = 1;
    pub const UDP: u8 = 2;
    pub const DNS: u8 = 3;
    pub const EXPOSE: u8 = 4;
    pub const INBOUND: u8 = 5;
    pub const ECHO: u8 = 6;
    pub const SOURCE: u8 = 7;
    pub const SINK: u8 = 8;
}

fn put_str(b: &mut BytesMut, s: &str) {
    let mut n = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    let s = &s.as_bytes()[..n];
    b.put_u16(s.len() as u16);
    b.put_slice(s);
}

fn put_addr(b: &mut BytesMut, a: &SocketAddr) {
    match a.ip() {
        IpAddr::V4(ip) => {
            b.put_u8(4);
            b.put_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            b.put_u8(6);
            b.put_slice(&ip.octets());
        }
    }
    b.put_u16(a.port());
}

fn put_opt_ip(b: &mut BytesMut, ip: &Option<IpAddr>) {
    match ip {
        None => b.put_u8(0),
        Some(IpAddr::V4(ip)) => {
            b.put_u8(4);
            b.put_slice(&ip.octets());
        }
        Some(IpAddr::V6(ip)) => {
            b.put_u8(6);
            b.put_slice(&ip.octets());
        }
    }
}

fn put_opt_addr(b: &mut BytesMut, a: &Option<SocketAddr>) {
    match a {
        None => b.put_u8(0),
        Some(a) => put_addr(b, a),
    }
}

impl Frame {
    /// Encodes the frame with its length prefix.
    pub fn encode(&self) -> BytesMut {
        let mut b = BytesMut::with_capacity(64);
        b.put_u32(0);
        match self {
            Frame::Hello {
                version,
                min_version,
                session,
                client,
            } => {
                b.put_u8(tag::HELLO);
                b.put_slice(&MAGIC);
                b.put_u16(*version);
                b.put_u16(*min_version);
                put_str(&mut b, session);
                put_str(&mut b, client);
            }
            Frame::Welcome {
                version,
                agent,
                pod_ip,
                dns,
            } => {
                b.put_u8(tag::WELCOME);
                b.put_u16(*version);
                put_str(&mut b, agent);
                put_opt_ip(&mut b, pod_ip);
                put_opt_addr(&mut b, dns);
            }
            Frame::Reject { reason } => {
                b.put_u8(tag::REJECT);
                put_str(&mut b, reason);
            }
            Frame::Ping { nonce } => {
                b.put_u8(tag::PING);
                b.put_u64(*nonce);
            }
            Frame::Pong { nonce } => {
                b.put_u8(tag::PONG);
                b.put_u64(*nonce);
            }
            Frame::Open(o) => {
                b.put_u8(tag::OPEN);
                match o {
                    Open::Tcp(a) => {
                        b.put_u8(open_kind::TCP);
                        put_addr(&mut b, a);
                    }
                    Open::Udp(a) => {
                        b.put_u8(open_kind::UDP);
                        put_addr(&mut b, a);
                    }
                    Open::Dns => b.put_u8(open_kind::DNS),
                    Open::Expose { port } => {
                        b.put_u8(open_kind::EXPOSE);
                        b.put_u16(*port);
                    }
                    Open::Inbound { port, peer } => {
                        b.put_u8(open_kind::INBOUND);
                        b.put_u16(*port);
                        put_addr(&mut b, peer);
                    }
                    Open::Echo => b.put_u8(open_kind::ECHO),
                    Open::Source { bytes } => {
                        b.put_u8(open_kind::SOURCE);
                        b.put_u64(*bytes);
                    }
                    Open::Sink => b.put_u8(open_kind::SINK),
                }
            }
            Frame::Reply(r) => {
                b.put_u8(tag::REPLY);
                match r {
                    None => b.put_u8(0),
                    Some((code, msg)) => {
                        b.put_u8(*code as u8);
                        put_str(&mut b, msg);
                    }
                }
            }
            Frame::Data(d) => {
                b.put_u8(tag::DATA);
                b.put_slice(d);
            }
        }
        let len = (b.len() - 4) as u32;
        b[..4].copy_from_slice(&len.to_be_bytes());
        b
    }

    /// Decodes one frame body (without its length prefix).
    pub fn decode(mut body: Bytes) -> Result<Frame, WireError> {
        let t = get_u8(&mut body, "tag")?;
        let f = match t {
            tag::HELLO => {
                let magic = take(&mut body, 4, "magic")?;
                if magic[..] != MAGIC {
                    return Err(WireError::BadMagic);
                }
                Frame::Hello {
                    version: get_u16(&mut body, "version")?,
                    min_version: get_u16(&mut body, "min version")?,
                    session: get_str(&mut body, "session")?,
                    client: get_str(&mut body, "client")?,
                }
            }
            tag::WELCOME => Frame::Welcome {
                version: get_u16(&mut body, "version")?,
                agent: get_str(&mut body, "agent")?,
                pod_ip: get_opt_ip(&mut body, "pod ip")?,
                dns: get_opt_addr(&mut body, "dns")?,
            },
            tag::REJECT => Frame::Reject {
                reason: get_str(&mut body, "reason")?,
            },
            tag::PING => Frame::Ping {
                nonce: get_u64(&mut body, "nonce")?,
            },
            tag::PONG => Frame::Pong {
                nonce: get_u64(&mut body, "nonce")?,
            },
            tag::OPEN => {
                let kind = get_u8(&mut body, "open kind")?;
                Frame::Open(match kind {
                    open_kind::TCP => Open::Tcp(get_addr(&mut body, "tcp target")?),
                    open_kind::UDP => Open::Udp(get_addr(&mut body, "udp target")?),
                    open_kind::DNS => Open::Dns,
                    open_kind::EXPOSE => Open::Expose {
                        port: get_u16(&mut body, "port")?,
                    },
                    open_kind::INBOUND => Open::Inbound {
                        port: get_u16(&mut body, "port")?,
                        peer: get_addr(&mut body, "peer")?,
                    },
                    open_kind::ECHO => Open::Echo,
                    open_kind::SOURCE => Open::Source {
                        bytes: get_u64(&mut body, "bytes")?,
                    },
                    open_kind::SINK => Open::Sink,
                    k => {
                        return Err(WireError::BadValue {
                            field: "open kind",
                            value: u32::from(k),
                        });
                    }
                })
            }
            tag::REPLY => {
                let code = get_u8(&mut body, "reply code")?;
                if code == 0 {
                    Frame::Reply(None)
                } else {
                    Frame::Reply(Some((
                        ErrorCode::from_u8(code)?,
                        get_str(&mut body, "reply message")?,
                    )))
                }
            }
            tag::DATA => return Ok(Frame::Data(body)),
            t => return Err(WireError::UnknownTag(t)),
        };
        if !body.is_empty() {
            return Err(WireError::Trailing(body.len()));
        }
        Ok(f)
    }
}

fn need(b: &Bytes, n: usize, what: &'static str) -> Result<(), WireError> {
    if b.remaining() < n {
        Err(WireError::Truncated(what))
    } else {
        Ok(())
    }
}

fn get_u8(b: &mut Bytes, what: &'static str) -> Result<u8, WireError> {
    need(b, 1, what)?;
    Ok(b.get_u8())
}

fn get_u16(b: &mut Bytes, what: &'static str) -> Result<u16, WireError> {
    need(b, 2, what)?;
    Ok(b.get_u16())
}

fn get_u64(b: &mut Bytes, what: &'static str) -> Result<u64, WireError> {
    need(b, 8, what)?;
    Ok(b.get_u64())
}

fn take(b: &mut Bytes, n: usize, what: &'static str) -> Result<Bytes, WireError> {
    need(b, n, what)?;
    Ok(b.split_to(n))
}

fn get_str(b: &mut Bytes, what: &'static str) -> Result<String, WireError> {
    let n = get_u16(b, what)? as usize;
    let raw = take(b, n, what)?;
    String::from_utf8(Vec::from(&raw[..])).map_err(|_| WireError::NotUtf8(what))
}

fn get_addr(b: &mut Bytes, what: &'static str) -> Result<SocketAddr, WireError> {
    match get_opt_addr(b, what)? {
        Some(a) => Ok(a),
        None => Err(WireError::BadValue {
            field: what,
            value: 0,
        }),
    }
}

fn get_opt_addr(b: &mut Bytes, what: &'static str) -> Result<Option<SocketAddr>, WireError> {
    match get_opt_ip(b, what)? {
        None => Ok(None),
        Some(ip) => Ok(Some(SocketAddr::new(ip, get_u16(b, what)?))),
    }
}

fn get_opt_ip(b: &mut Bytes, what: &'static str) -> Result<Option<IpAddr>, WireError> {
    let ip = match get_u8(b, what)? {
        0 => return Ok(None),
        4 => {
            let o = take(b, 4, what)?;
            IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], o[3]))
        }
        6 => {
            let o = take(b, 16, what)?;
            let mut a = [0u8; 16];
            a.copy_from_slice(&o);
            IpAddr::V6(Ipv6Addr::from(a))
        }
        f => {
            return Err(WireError::BadValue {
                field: what,
                value: u32::from(f),
            });
        }
    };
    Ok(Some(ip))
}

/// Reads the 4-byte length of the next frame and checks it against `max`.
pub fn frame_len(prefix: [u8; 4], max: usize) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max {
        return Err(WireError::TooLong { len, max });
    }
    if len == 0 {
        return Err(WireError::Truncated("tag"));
    }
    Ok(len)
}

/// Decodes every complete frame at the front of `buf` (a stream decoder, for fuzzing and for
/// readers that buffer). Stops at the first incomplete frame; an error ends decoding.
pub fn decode_stream(buf: &mut BytesMut, max: usize) -> Result<Vec<Frame>, WireError> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = frame_len([buf[0], buf[1], buf[2], buf[3]], max)?;
        if buf.len() < 4 + len {
            break;
        }
        buf.advance(4);
        out.push(Frame::decode(buf.split_to(len).freeze())?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;

    fn round_trip(f: Frame) {
        let enc = f.encode();
        let len = frame_len([enc[0], enc[1], enc[2], enc[3]], MAX_FRAME).expect("length");
        assert_eq!(len + 4, enc.len());
        assert_eq!(Frame::decode(enc.freeze().slice(4..)).expect("decodes"), f);
    }

    #[test]
    fn every_frame_round_trips() {
        let v4: SocketAddr = "10.96.0.10:53".parse().unwrap();
        let v6: SocketAddr = "[fd00::1]:8080".parse().unwrap();
        for f in [
            Frame::Hello {
                version: 1,
                min_version: 1,
                session: "abc123".into(),
                client: "ktctl 0.1.0".into(),
            },
            Frame::Welcome {
                version: 1,
                agent: "kt-router".into(),
                pod_ip: Some("10.244.1.5".parse().unwrap()),
                dns: Some(v4),
            },
            Frame::Welcome {
                version: 1,
                agent: String::new(),
                pod_ip: None,
                dns: None,
            },
            Frame::Reject {
                reason: "wrong session".into(),
            },
            Frame::Ping { nonce: u64::MAX },
            Frame::Pong { nonce: 7 },
            Frame::Open(Open::Tcp(v4)),
            Frame::Open(Open::Tcp(v6)),
            Frame::Open(Open::Udp(v4)),
            Frame::Open(Open::Dns),
            Frame::Open(Open::Expose { port: 8080 }),
            Frame::Open(Open::Inbound { port: 80, peer: v6 }),
            Frame::Open(Open::Echo),
            Frame::Open(Open::Source { bytes: 1 << 40 }),
            Frame::Open(Open::Sink),
            Frame::Reply(None),
            Frame::Reply(Some((ErrorCode::Refused, "connection refused".into()))),
            Frame::Data(Bytes::from_static(b"\x00\x01datagram")),
            Frame::Data(Bytes::new()),
        ] {
            round_trip(f);
        }
    }

    #[test]
    fn oversized_length_is_refused_before_reading() {
        assert_eq!(
            frame_len(5_000u32.to_be_bytes(), MAX_CONTROL_FRAME),
            Err(WireError::TooLong {
                len: 5000,
                max: MAX_CONTROL_FRAME
            })
        );
        assert_eq!(
            frame_len(u32::MAX.to_be_bytes(), MAX_FRAME).unwrap_err(),
            WireError::TooLong {
                len: u32::MAX as usize,
                max: MAX_FRAME
            }
        );
        assert_eq!(
            frame_len([0; 4], MAX_FRAME),
            Err(WireError::Truncated("tag"))
        );
    }

    #[test]
    fn malformed_frames_are_errors() {
        let cases: Vec<(Vec<u8>, WireError)> = vec![
            (vec![99], WireError::UnknownTag(99)),
            (vec![tag::PING, 1, 2], WireError::Truncated("nonce")),
            (
                vec![tag::HELLO, b'X', b'X', b'X', b'X'],
                WireError::BadMagic,
            ),
            (
                vec![tag::OPEN, 42],
                WireError::BadValue {
                    field: "open kind",
                    value: 42,
                },
            ),
            (
                vec![tag::OPEN, open_kind::TCP, 5, 1, 2, 3, 4, 0, 80],
                WireError::BadValue {
                    field: "tcp target",
                    value: 5,
                },
            ),
            (
                vec![tag::OPEN, open_kind::TCP, 4, 1, 2, 3],
                WireError::Truncated("tcp target"),
            ),
            (
                vec![tag::OPEN, open_kind::TCP, 0],
                WireError::BadValue {
                    field: "tcp target",
                    value: 0,
                },
            ),
            (
                vec![tag::REPLY, 9, 0, 0],
                WireError::BadValue {
                    field: "error code",
                    value: 9,
                },
            ),
            (
                vec![tag::REJECT, 0, 2, 0xff, 0xfe],
                WireError::NotUtf8("reason"),
            ),
            (
                vec![tag::REJECT, 0, 9, b'a'],
                WireError::Truncated("reason"),
            ),
            (
                vec![tag::PONG, 0, 0, 0, 0, 0, 0, 0, 1, 0xAA],
                WireError::Trailing(1),
            ),
            (vec![], WireError::Truncated("tag")),
        ];
        for (body, want) in cases {
            assert_eq!(
                Frame::decode(Bytes::from(body.clone())),
                Err(want),
                "body {body:?}"
            );
        }
    }

    /// Regression (found by the fuzzer): the pod IP was read as an address with a port that
    /// the encoder never writes, so a frame with a port there decoded and re-encoded differently.
    #[test]
    fn the_welcome_pod_ip_has_no_port() {
        let body = [tag::WELCOME, 0, 1, 0, 0, 4, 10, 244, 1, 5, 0];
        assert_eq!(
            Frame::decode(Bytes::copy_from_slice(&body)),
            Ok(Frame::Welcome {
                version: 1,
                agent: String::new(),
                pod_ip: Some("10.244.1.5".parse().unwrap()),
                dns: None
            })
        );
        let with_port = [tag::WELCOME, 0, 1, 0, 0, 4, 10, 244, 1, 5, 0, 80, 0];
        assert!(Frame::decode(Bytes::copy_from_slice(&with_port)).is_err());
    }

    #[test]
    fn stream_decoder_handles_partial_and_multiple_frames() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&Frame::Ping { nonce: 1 }.encode());
        buf.extend_from_slice(&Frame::Pong { nonce: 2 }.encode());
        let third = Frame::Open(Open::Echo).encode();
        buf.extend_from_slice(&third[..3]);
        let got = decode_stream(&mut buf, MAX_FRAME).unwrap();
        assert_eq!(
            got,
            vec![Frame::Ping { nonce: 1 }, Frame::Pong { nonce: 2 }]
        );
        assert_eq!(buf.len(), 3);
        buf.extend_from_slice(&third[3..]);
        assert_eq!(
            decode_stream(&mut buf, MAX_FRAME).unwrap(),
            vec![Frame::Open(Open::Echo)]
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn long_multibyte_strings_are_cut_at_a_character_boundary() {
        let f = Frame::Reject {
            reason: "é".repeat(40_000),
        };
        match Frame::decode(f.encode().freeze().slice(4..)).unwrap() {
            Frame::Reject { reason } => assert_eq!(reason, "é".repeat(32_767)),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn long_strings_are_truncated_not_corrupted() {
        let long = "x".repeat(70_000);
        let f = Frame::Reject { reason: long };
        let enc = f.encode();
        match Frame::decode(enc.freeze().slice(4..)).unwrap() {
            Frame::Reject { reason } => assert_eq!(reason.len(), u16::MAX as usize),
            other => panic!("unexpected {other:?}"),
        }
    }
}
