//! HTTP/1.1 framing shared by the relay's two sides (`downstream_h1` reads requests, `upstream_h1`
//! reads answers): header field values that frame a body, and the chunked decoder (RFC 9112 §7.1).
//! Errors name what is wrong; each side wraps them in its own error.

use bytes::{Buf, Bytes, BytesMut};

/// Longest chunk-size line or trailer line accepted.
const MAX_LINE: usize = 4 * 1024;

/// A parsed head's own copy, of its exact size, that its values point into: the read buffer it
/// was parsed from can go on (or go) without it.
pub(super) struct HeadCopy {
    raw: Bytes,
    base: usize,
}

impl HeadCopy {
    /// Copies the head, `buf[..len]`.
    pub(super) fn new(buf: &[u8], len: usize) -> Self {
        HeadCopy {
            raw: Bytes::copy_from_slice(&buf[..len]),
            base: buf.as_ptr() as usize,
        }
    }

    /// The copy of `part`, a slice of the head in the buffer given to `new`.
    pub(super) fn part(&self, part: &[u8]) -> Bytes {
        let at = part.as_ptr() as usize - self.base;
        self.raw.slice(at..at + part.len())
    }
}

/// How many of `available` bytes belong to a body with `rest` bytes still to come.
pub(super) fn take_len(rest: u64, available: usize) -> usize {
    usize::try_from(rest).map_or(available, |r| r.min(available))
}

/// A `Content-Length` value.
pub(super) fn parse_length(value: &[u8]) -> Result<u64, &'static str> {
    let digits = value.trim_ascii();
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return Err("invalid content-length");
    }
    Ok(digits
        .iter()
        .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')))
}

/// Adds a `Content-Length` field to the length the head announced so far: repeated fields must
/// agree.
pub(super) fn add_length(length: &mut Option<u64>, value: &[u8]) -> Result<(), &'static str> {
    let n = parse_length(value)?;
    if length.is_some_and(|l| l != n) {
        return Err("conflicting content-length");
    }
    *length = Some(n);
    Ok(())
}

/// Whether the connection stays open after a `Connection` field: `close` ends it, `keep-alive`
/// keeps an HTTP/1.0 one; otherwise `keep` stands.
pub(super) fn keeps_alive(value: &[u8], http10: bool, keep: bool) -> bool {
    if has_token(value, b"close") {
        false
    } else if http10 && has_token(value, b"keep-alive") {
        true
    } else {
        keep
    }
}

/// The size of a chunk from its line (`1a2b;ext=1`).
pub(super) fn parse_chunk_size(line: &[u8]) -> Result<u64, &'static str> {
    let end = line
        .iter()
        .position(|&b| b == b';' || b == b' ' || b == b'\t')
        .unwrap_or(line.len());
    let hex = &line[..end];
    if hex.is_empty() || hex.len() > 15 {
        return Err("invalid chunk size");
    }
    let mut size = 0u64;
    for &b in hex {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return Err("invalid chunk size"),
        };
        size = size * 16 + u64::from(d);
    }
    Ok(size)
}

pub(super) fn last_token(value: &[u8]) -> &[u8] {
    value
        .rsplit(|&b| b == b',')
        .next()
        .unwrap_or_default()
        .trim_ascii()
}

pub(super) fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Position inside a chunked body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk's data: bytes still to come.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines up to an empty line.
    Trailers,
}

/// What one step of the chunked decoder did.
pub(super) enum ChunkStep {
    /// A piece of data, split off the buffer.
    Piece(BytesMut),
    /// The decoder moved on (a size line, a chunk's end, a trailer line).
    Moved,
    /// What is buffered is not enough to move on.
    NeedMore,
    /// The empty line after the trailers: the body is complete.
    End,
}

impl Chunk {
    /// Advances the decoder over what `buf` holds by one step.
    pub(super) fn step(&mut self, buf: &mut BytesMut) -> Result<ChunkStep, &'static str> {
        match *self {
            Chunk::Size => {
                let Some((content, whole)) = line_len(buf)? else {
                    return Ok(ChunkStep::NeedMore);
                };
                let size = parse_chunk_size(&buf[..content])?;
                buf.advance(whole);
                *self = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
                Ok(ChunkStep::Moved)
            }
            Chunk::Data(_) => match self.take_data(buf.len()) {
                0 => Ok(ChunkStep::NeedMore),
                n => Ok(ChunkStep::Piece(buf.split_to(n))),
            },
            Chunk::DataEnd => {
                // CRLF, or a bare LF as accepted after the size and trailer lines.
                let end = match buf.first() {
                    None => return Ok(ChunkStep::NeedMore),
                    Some(b'\n') => 1,
                    Some(b'\r') if buf.len() < 2 => return Ok(ChunkStep::NeedMore),
                    Some(b'\r') if buf[1] == b'\n' => 2,
                    Some(_) => return Err("chunk data not followed by CRLF"),
                };
                buf.advance(end);
                *self = Chunk::Size;
                Ok(ChunkStep::Moved)
            }
            Chunk::Trailers => match line_len(buf)? {
                None => Ok(ChunkStep::NeedMore),
                Some((content, whole)) => {
                    buf.advance(whole);
                    Ok(if content == 0 {
                        ChunkStep::End
                    } else {
                        ChunkStep::Moved
                    })
                }
            },
        }
    }
}

impl Chunk {
    /// [`Chunk::step`], except that a piece of data is copied to `out` and skipped in `buf`
    /// (then the step is `Moved`) instead of split off the buffer.
    pub(super) fn step_copy(
        &mut self,
        buf: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<ChunkStep, &'static str> {
        if !matches!(self, Chunk::Data(_)) {
            return self.step(buf);
        }
        match self.take_data(buf.len()) {
            0 => Ok(ChunkStep::NeedMore),
            n => {
                out.extend_from_slice(&buf[..n]);
                buf.advance(n);
                Ok(ChunkStep::Moved)
            }
        }
    }

    /// Inside a chunk's data with `buffered` bytes at hand: how many of them are data (0 when
    /// none is buffered), counted as taken.
    fn take_data(&mut self, buffered: usize) -> usize {
        let Chunk::Data(rest) = *self else {
            return 0;
        };
        let n = take_len(rest, buffered);
        if n > 0 {
            let left = rest - n as u64;
            *self = if left == 0 {
                Chunk::DataEnd
            } else {
                Chunk::Data(left)
            };
        }
        n
    }
}

/// The length of the first line's content (without its line end) and of the whole line, if a
/// whole one is buffered. (Read in place and skipped: splitting it off the buffer cost two
/// atomic reference count updates per chunk.)
fn line_len(buf: &[u8]) -> Result<Option<(usize, usize)>, &'static str> {
    let Some(end) = memchr::memchr(b'\n', buf) else {
        if buf.len() > MAX_LINE {
            return Err("line too long in chunked body");
        }
        return Ok(None);
    };
    if end > MAX_LINE {
        return Err("line too long in chunked body");
    }
    let content = if end > 0 && buf[end - 1] == b'\r' {
        end - 1
    } else {
        end
    };
    Ok(Some((content, end + 1)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing unwrap is a failing test
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_and_tokens() {
        assert_eq!(parse_chunk_size(b"0").unwrap(), 0);
        assert_eq!(parse_chunk_size(b"fF;a=b").unwrap(), 255);
        assert_eq!(parse_chunk_size(b"10 ").unwrap(), 16);
        assert!(parse_chunk_size(b"").is_err());
        assert!(parse_chunk_size(b";x").is_err());
        assert!(parse_chunk_size(b"0x10").is_err());
        assert_eq!(parse_length(b" 42 ").unwrap(), 42);
        assert!(parse_length(b"4 2").is_err());
        assert!(parse_length(b"99999999999999999999").is_err());
        assert!(has_token(b"Keep-Alive, close", b"close"));
        assert!(!has_token(b"closed", b"close"));
        assert_eq!(last_token(b"gzip , chunked "), b"chunked");
    }
}
