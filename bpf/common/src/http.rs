//! The status line of an HTTP/1.x response (`HTTP/1.1 503 ...`), parsed a
//! segment at a time: a response whose first segment ends inside the status
//! line is finished with the next one.
//!
//! Only the first 12 bytes matter: `HTTP/1.` digit, space, three digits. The
//! parser keeps its position and the digits so far in 4 bytes of the
//! connection's conntrack entry.

/// `HTTP/1.x NNN`.
pub const STATUS_LINE_LEN: usize = 12;

/// How far a response's status line has been read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatusParse {
    /// Bytes of the status line matched so far (0 to 11).
    pub pos: u8,
    /// The status digits matched so far.
    pub code: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feed {
    /// The segment ended inside a valid status line.
    Incomplete(StatusParse),
    /// A complete status line with this code.
    Done(u16),
    /// Not an HTTP/1.x status line.
    Invalid,
}

/// The literal bytes of a status line: positions 0 to 6, and (in the last
/// byte) position 8. Packed in a word and shifted out, not indexed: a table
/// in memory would need a bounds proof the verifier cannot make here.
const LITERAL: u64 = u64::from_le_bytes(*b"HTTP/1. ");

/// Whether byte `b` may stand at position `pos` of a status line.
#[inline(always)]
const fn byte_ok(pos: usize, b: u8) -> bool {
    match pos {
        7 | 10 | 11 => b.is_ascii_digit(),
        9 => b >= b'1' && b <= b'9',
        8 => b == (LITERAL >> 56) as u8,
        0..=6 => b == (LITERAL >> (pos * 8)) as u8,
        _ => false,
    }
}

/// Feeds the first `len` bytes of `bytes` (a segment's payload, up to 12) to
/// the parser in state `s`.
#[inline(always)]
pub fn feed(mut s: StatusParse, bytes: &[u8; STATUS_LINE_LEN], len: usize) -> Feed {
    let mut i = 0;
    while i < STATUS_LINE_LEN && i < len {
        let pos = s.pos as usize;
        let b = bytes[i];
        if !byte_ok(pos, b) {
            return Feed::Invalid;
        }
        if pos >= 9 {
            s.code = s.code * 10 + (b - b'0') as u16;
        }
        if pos == STATUS_LINE_LEN - 1 {
            return Feed::Done(s.code);
        }
        s.pos += 1;
        i += 1;
    }
    Feed::Incomplete(s)
}

/// Request classes counted per backend.
pub const CLASS_OTHER: usize = 0;
pub const CLASS_2XX: usize = 1;
pub const CLASS_3XX: usize = 2;
pub const CLASS_4XX: usize = 3;
pub const CLASS_5XX: usize = 4;
/// An exchange on a `protocol: tcp` service: timed, no status.
pub const CLASS_NONE: usize = 5;
pub const CLASSES: usize = 6;

/// Label values, by class index.
pub const CLASS_NAMES: [&str; CLASSES] = ["other", "2xx", "3xx", "4xx", "5xx", "none"];

/// The class of a status code (1xx and anything odd count as `other`).
#[inline(always)]
pub const fn class_of(code: u16) -> usize {
    match code / 100 {
        2 => CLASS_2XX,
        3 => CLASS_3XX,
        4 => CLASS_4XX,
        5 => CLASS_5XX,
        _ => CLASS_OTHER,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(segments: &[&[u8]]) -> Feed {
        let mut s = StatusParse::default();
        for seg in segments {
            let mut buf = [0u8; STATUS_LINE_LEN];
            let n = seg.len().min(STATUS_LINE_LEN);
            buf[..n].copy_from_slice(&seg[..n]);
            match feed(s, &buf, n) {
                Feed::Incomplete(next) => s = next,
                done => return done,
            }
        }
        Feed::Incomplete(s)
    }

    #[test]
    fn whole_status_lines() {
        assert_eq!(run(&[b"HTTP/1.1 200 OK\r\n"]), Feed::Done(200));
        assert_eq!(
            run(&[b"HTTP/1.0 503 Service Unavailable\r\n"]),
            Feed::Done(503)
        );
        assert_eq!(run(&[b"HTTP/1.1 404"]), Feed::Done(404));
    }

    #[test]
    fn split_at_every_offset() {
        let line = b"HTTP/1.1 302 Found\r\n";
        for cut in 1..STATUS_LINE_LEN {
            assert_eq!(
                run(&[&line[..cut], &line[cut..]]),
                Feed::Done(302),
                "cut at {cut}"
            );
        }
        assert_eq!(run(&[b"HT", b"TP/", b"1.1 ", b"50", b"0"]), Feed::Done(500));
    }

    #[test]
    fn pipelined_responses_parse_the_first() {
        assert_eq!(
            run(&[b"HTTP/1.1 201 Created\r\n\r\nHTTP/1.1 500 x\r\n"]),
            Feed::Done(201)
        );
    }

    #[test]
    fn not_http() {
        for bad in [
            &b"SSH-2.0-OpenSSH"[..],
            b"http/1.1 200",
            b"HTTP/2 200 OK",
            b"HTTP/1.1 20x",
            b"HTTP/1.1  200",
            b"HTTP/1.1 099",
        ] {
            assert_eq!(
                run(&[bad]),
                Feed::Invalid,
                "{:?}",
                core::str::from_utf8(bad)
            );
        }
        assert_eq!(run(&[b"HTTP/1.1 2", b"x"]), Feed::Invalid);
    }

    #[test]
    fn short_segments_stay_incomplete() {
        assert!(matches!(
            run(&[b"HTTP/1."]),
            Feed::Incomplete(StatusParse { pos: 7, code: 0 })
        ));
        assert!(matches!(
            run(&[b"HTTP/1.1 4"]),
            Feed::Incomplete(StatusParse { pos: 10, code: 4 })
        ));
    }

    #[test]
    fn classes() {
        assert_eq!(class_of(200), CLASS_2XX);
        assert_eq!(class_of(299), CLASS_2XX);
        assert_eq!(class_of(301), CLASS_3XX);
        assert_eq!(class_of(404), CLASS_4XX);
        assert_eq!(class_of(503), CLASS_5XX);
        assert_eq!(class_of(101), CLASS_OTHER);
        assert_eq!(class_of(999), CLASS_OTHER);
        assert_eq!(CLASS_NAMES[CLASS_5XX], "5xx");
    }
}
