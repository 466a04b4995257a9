//! Just enough of the DNS message format (RFC 1035 §4.1) to tell whether a reply answers a
//! query: the header and the first question, read in place, every offset checked. Relays use
//! it to drop replies that are not theirs (a late answer to an earlier query, or a spoofed
//! one) instead of handing them to the application.

/// Length of the DNS header.
const HEADER: usize = 12;
/// Longest name on the wire (RFC 1035 §2.3.4).
const MAX_NAME: usize = 255;
/// Most compression pointers followed in one name: a name has at most 127 labels, and a
/// legitimate first question needs none.
const MAX_POINTERS: usize = 16;

/// Whether `reply` is a response to `query`: the same ID and opcode, the response bit set, the
/// same number of questions, and the same first question (name compared ASCII
/// case-insensitively, type and class equal). Truncated or malformed packets never match.
///
/// The query's name must not be compressed (nothing precedes it to point to); the reply's may
/// be, and its pointers are followed within the packet, at most a few times.
pub fn reply_matches(query: &[u8], reply: &[u8]) -> bool {
    matches(query, reply).is_some()
}

fn matches(query: &[u8], reply: &[u8]) -> Option<()> {
    let (q, r) = (query.get(..HEADER)?, reply.get(..HEADER)?);
    // ID, and then QR (the high bit) clear in the query, set in the reply.
    if q[..2] != r[..2] || q[2] & 0x80 != 0 || r[2] & 0x80 == 0 {
        return None;
    }
    // Opcode.
    if (q[2] >> 3) & 0x0f != (r[2] >> 3) & 0x0f {
        return None;
    }
    // QDCOUNT.
    if q[4..6] != r[4..6] {
        return None;
    }
    if q[4..6] == [0, 0] {
        return Some(());
    }
    let mut a = Name::new(query, false);
    let mut b = Name::new(reply, true);
    loop {
        let (x, y) = (a.label()?, b.label()?);
        if !x.eq_ignore_ascii_case(y) {
            return None;
        }
        if x.is_empty() {
            break;
        }
    }
    // QTYPE and QCLASS.
    let (qa, qb) = (a.end?, b.end?);
    (query.get(qa..qa + 4)? == reply.get(qb..qb + 4)?).then_some(())
}

/// Reads the labels of the name that starts the first question.
struct Name<'a> {
    msg: &'a [u8],
    pos: usize,
    pointers_allowed: bool,
    pointers: usize,
    /// Bytes of the name so far, as if uncompressed.
    len: usize,
    /// Where the question goes on after the name, once known.
    end: Option<usize>,
}

impl<'a> Name<'a> {
    fn new(msg: &'a [u8], pointers_allowed: bool) -> Name<'a> {
        Name {
            msg,
            pos: HEADER,
            pointers_allowed,
            pointers: 0,
            len: 0,
            end: None,
        }
    }

    /// The next label; empty at the root, which ends the name. `None` if malformed.
    fn label(&mut self) -> Option<&'a [u8]> {
        loop {
            let len = usize::from(*self.msg.get(self.pos)?);
            match len & 0xc0 {
                0x00 => {
                    let label = self.msg.get(self.pos + 1..self.pos + 1 + len)?;
                    self.pos += 1 + len;
                    self.len += 1 + len;
                    if self.len > MAX_NAME {
                        return None;
                    }
                    if len == 0 && self.end.is_none() {
                        self.end = Some(self.pos);
                    }
                    return Some(label);
                }
                0xc0 if self.pointers_allowed => {
                    let low = usize::from(*self.msg.get(self.pos + 1)?);
                    if self.end.is_none() {
                        self.end = Some(self.pos + 2);
                    }
                    self.pointers += 1;
                    if self.pointers > MAX_POINTERS {
                        return None;
                    }
                    self.pos = (len & 0x3f) << 8 | low;
                }
                // Pointers where none may be, and the reserved label types.
                _ => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    /// A message with a header and one question; `reply` sets QR.
    fn msg(id: u16, reply: bool, name: &[&str], qtype: u16, qclass: u16) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&[if reply { 0x81 } else { 0x01 }, 0x00]); // RD (+QR)
        m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
        for l in name {
            m.push(l.len() as u8);
            m.extend_from_slice(l.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&qclass.to_be_bytes());
        m
    }

    const NAME: &[&str] = &["nginx", "default", "svc", "cluster", "local"];

    fn query() -> Vec<u8> {
        msg(0x1234, false, NAME, 1, 1)
    }

    #[test]
    fn a_reply_to_the_same_question_matches() {
        let mut reply = msg(0x1234, true, NAME, 1, 1);
        // Answers after the question do not matter.
        reply.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 10, 96, 0, 7]);
        reply[7] = 1;
        assert!(reply_matches(&query(), &reply));
    }

    #[test]
    fn names_compare_without_case() {
        let reply = msg(
            0x1234,
            true,
            &["NGINX", "Default", "svc", "cluster", "local"],
            1,
            1,
        );
        assert!(reply_matches(&query(), &reply));
    }

    #[test]
    fn another_id_does_not_match() {
        assert!(!reply_matches(&query(), &msg(0x1235, true, NAME, 1, 1)));
    }

    #[test]
    fn another_name_does_not_match() {
        for name in [
            &["nginy", "default", "svc", "cluster", "local"][..],
            &["nginx", "default", "svc", "cluster"],
            &["nginx", "default", "svc", "cluster", "local", "evil"],
            &[],
        ] {
            assert!(
                !reply_matches(&query(), &msg(0x1234, true, name, 1, 1)),
                "{name:?}"
            );
        }
    }

    #[test]
    fn another_type_or_class_does_not_match() {
        assert!(!reply_matches(&query(), &msg(0x1234, true, NAME, 28, 1)));
        assert!(!reply_matches(&query(), &msg(0x1234, true, NAME, 1, 3)));
    }

    #[test]
    fn a_query_or_another_opcode_is_no_reply() {
        assert!(!reply_matches(&query(), &query()));
        let mut notify = msg(0x1234, true, NAME, 1, 1);
        notify[2] |= 4 << 3;
        assert!(!reply_matches(&query(), &notify));
    }

    #[test]
    fn a_reply_without_the_question_does_not_match() {
        let mut reply = msg(0x1234, true, &[], 1, 1);
        reply.truncate(HEADER);
        reply[5] = 0;
        assert!(!reply_matches(&query(), &reply));
    }

    #[test]
    fn truncated_packets_never_match() {
        let reply = msg(0x1234, true, NAME, 1, 1);
        for n in 0..reply.len() {
            assert!(!reply_matches(&query(), &reply[..n]), "reply cut at {n}");
            assert!(!reply_matches(&query()[..n], &reply), "query cut at {n}");
        }
    }

    #[test]
    fn garbage_never_matches_and_never_panics() {
        let q = query();
        // A label running past the end, a reserved label type, a label longer than a name.
        let mut long = q.clone();
        long[2] |= 0x80;
        long[12] = 63;
        let mut reserved = msg(0x1234, true, NAME, 1, 1);
        reserved[12] = 0x80 | 5;
        assert!(!reply_matches(&q, &long[..20]));
        assert!(!reply_matches(&q, &reserved));
        // Bytes from a simple generator, with the query's header so they get past it.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for len in 0..2_000 {
            let mut junk = Vec::with_capacity(len % 300 + HEADER);
            junk.extend_from_slice(&q[..HEADER]);
            junk[2] |= 0x80;
            for _ in 0..len % 300 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                junk.push(x as u8 | if len % 3 == 0 { 0xc0 } else { 0 });
            }
            let _ = reply_matches(&q, &junk);
            let _ = reply_matches(&junk, &q);
        }
    }

    #[test]
    fn compression_pointers_are_followed_in_a_reply_and_refused_in_a_query() {
        // The reply's question points at a copy of the name after it (odd, but readable).
        let mut reply = msg(0x1234, true, &[], 1, 1);
        reply.truncate(HEADER);
        let target = HEADER + 6;
        reply.extend_from_slice(&[0xc0, target as u8, 0, 1, 0, 1]);
        reply.extend_from_slice(&msg(0, false, NAME, 0, 0)[HEADER..]);
        assert!(reply_matches(&query(), &reply));
        // A query's name cannot point anywhere.
        let mut q = msg(0x1234, false, &[], 1, 1);
        q.truncate(HEADER);
        q.extend_from_slice(&[0xc0, target as u8, 0, 1, 0, 1]);
        q.extend_from_slice(&msg(0, false, NAME, 0, 0)[HEADER..]);
        assert!(!reply_matches(&q, &reply));
        // Pointer loops end.
        let mut looped = msg(0x1234, true, &[], 1, 1);
        looped.truncate(HEADER);
        looped.extend_from_slice(&[0xc0, HEADER as u8, 0, 1, 0, 1]);
        assert!(!reply_matches(&query(), &looped));
        let mut pointing_out = looped.clone();
        pointing_out[HEADER + 1] = 200;
        assert!(!reply_matches(&query(), &pointing_out));
    }
}
