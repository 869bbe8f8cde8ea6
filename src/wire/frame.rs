//! Message framing after the startup packet: a one-byte tag, a four-byte big-endian length that counts
//! itself, and the body.
//!
//! [`FrameScanner`] walks a byte buffer and tells its caller, step by step, what it may forward. Messages
//! the caller wants to inspect are reported only once they are complete in the buffer (`Step::Message`);
//! everything else is reported as soon as its header is readable (`Step::Stream`) and its body is passed
//! through as it arrives (`Step::Pass`), so a 1 GiB CopyData never has to sit in memory. A declared length
//! below 4 or above the configured maximum is rejected before anything is buffered for it.

use thiserror::Error;

/// Size of the tag plus the length field.
pub const HEADER_LEN: usize = 5;

/// A framing violation by the peer. The session that produced it cannot continue.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error("invalid message length {len} for message type {tag:?} (below the minimum of 4)")]
    TooShort { tag: char, len: u32 },
    #[error("message type {tag:?} declares {len} bytes, above the limit of {max} bytes")]
    TooLong { tag: char, len: u32, max: usize },
    /// What arrived cannot be PostgreSQL's protocol at this point (an HTTP server's reply, say).
    #[error(
        "the upstream did not answer as a PostgreSQL server (a message of type {tag:?} {during})"
    )]
    NotPostgres { tag: char, during: &'static str },
}

/// What the caller may do with the bytes at the front of the unscanned part of its buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Not enough bytes to make progress; read more.
    NeedMore,
    /// A complete message the caller asked to inspect: `len` bytes including tag and length field.
    Message { tag: u8, len: usize },
    /// The header of a message that is streamed: `now` bytes (header plus whatever body is available)
    /// may be forwarded at once; the remaining `total - now` bytes follow as `Pass` steps.
    Stream { tag: u8, total: usize, now: usize },
    /// `n` more body bytes of the message currently being streamed.
    Pass(usize),
}

/// Tracks message boundaries across reads. One per direction of a connection.
#[derive(Debug, Clone)]
pub struct FrameScanner {
    max_len: usize,
    /// Body bytes of the current streamed message not yet seen.
    remaining: usize,
}

impl FrameScanner {
    /// `max_len` is the largest acceptable message, counted as the length field counts it.
    pub fn new(max_len: usize) -> Self {
        FrameScanner {
            max_len,
            remaining: 0,
        }
    }

    /// Changes the size limit (e.g. when login completes). Applies from the next message header on.
    pub fn set_max_len(&mut self, max_len: usize) {
        self.max_len = max_len;
    }

    /// True when the scanner is between messages: injecting a message of our own here keeps framing.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// Looks at `avail` (the bytes not yet consumed) and says what can be done with its front.
    /// `inspect(tag)` decides which messages must be delivered whole. The caller consumes exactly the
    /// bytes a step names (`len`, `now` or `n`) before calling again.
    #[inline]
    pub fn step(&mut self, avail: &[u8], inspect: impl Fn(u8) -> bool) -> Result<Step, FrameError> {
        if self.remaining > 0 {
            let n = self.remaining.min(avail.len());
            if n == 0 {
                return Ok(Step::NeedMore);
            }
            self.remaining -= n;
            return Ok(Step::Pass(n));
        }
        if avail.len() < HEADER_LEN {
            return Ok(Step::NeedMore);
        }
        let tag = avail[0];
        // At least HEADER_LEN bytes: the length is there.
        let len = be_u32(avail, 1).unwrap_or(0);
        if len < 4 {
            return Err(FrameError::TooShort {
                tag: tag as char,
                len,
            });
        }
        if len as usize > self.max_len {
            return Err(FrameError::TooLong {
                tag: tag as char,
                len,
                max: self.max_len,
            });
        }
        let total = len as usize + 1;
        if inspect(tag) {
            if avail.len() >= total {
                Ok(Step::Message { tag, len: total })
            } else {
                Ok(Step::NeedMore)
            }
        } else {
            let now = total.min(avail.len());
            self.remaining = total - now;
            Ok(Step::Stream { tag, total, now })
        }
    }
}

/// The body of a complete message (after tag and length).
#[inline]
pub fn body(msg: &[u8]) -> &[u8] {
    msg.get(HEADER_LEN..).unwrap_or(&[])
}

/// The big-endian `u32` at `at` in `buf`, if `buf` is long enough.
#[inline]
pub fn be_u32(buf: &[u8], at: usize) -> Option<u32> {
    buf.get(at..at + 4)?.try_into().ok().map(u32::from_be_bytes)
}

/// The big-endian `i32` at `at` in `buf`, if `buf` is long enough.
#[inline]
pub fn be_i32(buf: &[u8], at: usize) -> Option<i32> {
    be_u32(buf, at).map(|v| v as i32)
}

/// Reads a NUL-terminated string at the front of `buf`; returns it (without the NUL) and the rest.
pub fn cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = buf.iter().position(|&b| b == 0)?;
    Some((&buf[..nul], &buf[nul + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    /// Runs the scanner over `input` delivered in chunks of `chunk` bytes and returns the sequence of
    /// (tag, bytes) it reports, merging a streamed message's pieces.
    fn scan_all(
        input: &[u8],
        chunk: usize,
        inspect: impl Fn(u8) -> bool + Copy,
    ) -> Vec<(u8, Vec<u8>)> {
        let mut sc = FrameScanner::new(1 << 20);
        let mut buf: Vec<u8> = Vec::new();
        let mut out: Vec<(u8, Vec<u8>)> = Vec::new();
        for piece in input.chunks(chunk) {
            buf.extend_from_slice(piece);
            loop {
                match sc.step(&buf, inspect).unwrap() {
                    Step::NeedMore => break,
                    Step::Message { tag, len } => {
                        out.push((tag, buf[..len].to_vec()));
                        buf.drain(..len);
                    }
                    Step::Stream { tag, now, .. } => {
                        out.push((tag, buf[..now].to_vec()));
                        buf.drain(..now);
                    }
                    Step::Pass(n) => {
                        out.last_mut().unwrap().1.extend_from_slice(&buf[..n]);
                        buf.drain(..n);
                    }
                }
            }
        }
        assert!(buf.is_empty());
        assert!(sc.at_boundary());
        out
    }

    #[test]
    fn frames_survive_any_chunking() {
        let mut input = msg(b'Q', b"select 1\0");
        input.extend(msg(b'd', &vec![7u8; 5000]));
        input.extend(msg(b'S', b""));
        input.extend(msg(b'X', b""));
        for chunk in [1, 2, 3, 5, 7, 64, 4096, 100_000] {
            let got = scan_all(&input, chunk, |t| t == b'Q' || t == b'X');
            assert_eq!(got.len(), 4, "chunk {chunk}");
            assert_eq!(got[0].1, msg(b'Q', b"select 1\0"));
            assert_eq!(got[1].1.len(), 5005);
            assert_eq!(got[2], (b'S', msg(b'S', b"")));
            assert_eq!(got[3].0, b'X');
        }
    }

    #[test]
    fn inspected_message_waits_until_complete() {
        let m = msg(b'Q', b"select 1\0");
        let mut sc = FrameScanner::new(100);
        assert_eq!(sc.step(&m[..m.len() - 1], |_| true), Ok(Step::NeedMore));
        assert_eq!(
            sc.step(&m, |_| true),
            Ok(Step::Message {
                tag: b'Q',
                len: m.len()
            })
        );
    }

    #[test]
    fn lengths_are_checked_before_buffering() {
        let mut sc = FrameScanner::new(100);
        assert_eq!(
            sc.step(&[b'Q', 0, 0, 0, 3], |_| true),
            Err(FrameError::TooShort { tag: 'Q', len: 3 })
        );
        assert_eq!(
            sc.step(&[b'Q', 0xff, 0xff, 0xff, 0xff], |_| true),
            Err(FrameError::TooLong {
                tag: 'Q',
                len: u32::MAX,
                max: 100
            })
        );
        // The limit counts as the length field does: 100 is fine, 101 is not.
        assert!(matches!(
            sc.step(&[b'd', 0, 0, 0, 100], |_| false),
            Ok(Step::Stream { .. })
        ));
        let mut sc = FrameScanner::new(100);
        assert!(sc.step(&[b'd', 0, 0, 0, 101], |_| false).is_err());
    }

    #[test]
    fn cstr_splits() {
        assert_eq!(cstr(b"ab\0cd"), Some((&b"ab"[..], &b"cd"[..])));
        assert_eq!(cstr(b"ab"), None);
    }
}

/// AuthenticationSASL (`R`, code 10) with the channel-binding mechanisms (`*-PLUS`) removed, as a complete
/// message; None when `body` is not an AuthenticationSASL or offers nothing to remove.
///
/// A client whose own connection to stepgate is not TLS refuses a server that offers channel binding
/// (libpq: "server offered SCRAM-SHA-256-PLUS authentication over a non-SSL connection"), yet the offer is
/// true only of the upstream leg. Removing it lets such clients use plain SCRAM-SHA-256.
pub fn sasl_without_channel_binding(body: &[u8]) -> Option<Vec<u8>> {
    if body.len() < 4 || body[..4] != 10u32.to_be_bytes() {
        return None;
    }
    let mut rest = &body[4..];
    let mut kept: Vec<&[u8]> = Vec::new();
    let mut removed = false;
    loop {
        let (mech, after) = cstr(rest)?;
        if mech.is_empty() {
            break;
        }
        if mech.ends_with(b"-PLUS") {
            removed = true;
        } else {
            kept.push(mech);
        }
        rest = after;
    }
    if !removed {
        return None;
    }
    let len = 4 + 4 + kept.iter().map(|m| m.len() + 1).sum::<usize>() + 1;
    let mut out = Vec::with_capacity(len + 1);
    out.push(b'R');
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.extend_from_slice(&10u32.to_be_bytes());
    for m in kept {
        out.extend_from_slice(m);
        out.push(0);
    }
    out.push(0);
    Some(out)
}

#[cfg(test)]
mod sasl_tests {
    use super::*;

    #[test]
    fn plus_mechanisms_are_removed() {
        let body = b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0";
        let out = sasl_without_channel_binding(body).unwrap();
        assert_eq!(&out[..1], b"R");
        assert_eq!(be_u32(&out, 1).unwrap() as usize, out.len() - 1);
        assert_eq!(&out[5..], b"\0\0\0\x0aSCRAM-SHA-256\0\0");
        assert_eq!(
            sasl_without_channel_binding(b"\0\0\0\x0aSCRAM-SHA-256\0\0"),
            None
        );
        assert_eq!(sasl_without_channel_binding(b"\0\0\0\x05salt"), None);
        assert_eq!(sasl_without_channel_binding(b"\0\0\0\x0aSCRAM"), None);
    }
}
