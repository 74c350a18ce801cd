//! The relay's HTTP/1.1 client for upstream exchanges, over the raw streams of Pingora's
//! transport connector (TCP and TLS; idle connections are kept in the relay's own pool).
//!
//! Pingora's own HTTP/1 client flushes the request head before the body (two sends, two
//! wake-ups of the upstream), copies every response body chunk into a new allocation, and keeps
//! a 64 KiB body buffer per connection for as long as a stream lasts. This client writes head and
//! body with one vectored write, hands out response body chunks as slices of its read buffer
//! (no copy), and reads into a buffer that starts at 4 KiB, grows while reads fill it, and is
//! reused in place once the pieces handed out are gone.
//!
//! Framing follows RFC 9112 §6: no body after HEAD, 1xx, 204 and 304; `Transfer-Encoding` whose
//! last coding is `chunked`; `Content-Length`; otherwise the body ends when the connection
//! closes (and the connection is not reused).

use std::io::{IoSlice, Write as _};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use pingora::protocols::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use relay_filters::context::UpstreamRequest;

use super::h1::{add_length, keeps_alive, last_token, take_len, Chunk, ChunkStep, HeadCopy};
use super::header_names::header_name;

/// First read size: a response head and a usual JSON answer fit; a held stream of small
/// events never needs more, and touches one page of it.
const FIRST_READ: usize = 4 * 1024;
/// Largest read size, reached by doubling while reads fill all the space offered.
const MAX_READ: usize = 64 * 1024;
/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a response head (providers send 20 to 50; Pingora allows as many).
const MAX_HEADERS: usize = 256;
/// How soon after the request went out a pooled connection's close still means the upstream
/// had closed it while idle (its close or reset arrives within a round trip). Later, it may
/// have been working on the request, and sending it again could run and bill it twice.
const RESEND_WINDOW: Duration = Duration::from_secs(1);

/// Why an exchange with the upstream failed.
#[derive(Debug)]
pub(super) enum H1Error {
    Io(std::io::Error),
    /// No byte arrived within the read timeout.
    Timeout,
    /// The upstream closed the connection before the head or the body was complete.
    Closed(&'static str),
    /// What the upstream sent is not HTTP/1.x as RFC 9112 frames it.
    Malformed(&'static str),
    /// The request cannot be written as HTTP/1.1 (a control byte in its target, say).
    BadRequest(&'static str),
}

impl std::fmt::Display for H1Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            H1Error::Io(e) => write!(f, "upstream i/o error: {e}"),
            H1Error::Timeout => f.write_str("upstream read timed out"),
            H1Error::Closed(what) => write!(f, "upstream closed the connection {what}"),
            H1Error::Malformed(what) => write!(f, "malformed upstream response: {what}"),
            H1Error::BadRequest(what) => write!(f, "request cannot be sent upstream: {what}"),
        }
    }
}

impl From<std::io::Error> for H1Error {
    fn from(e: std::io::Error) -> Self {
        H1Error::Io(e)
    }
}

/// A response head: status and header fields (names lower-case, order kept).
pub(super) struct UpstreamHead {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
}

/// What the buffer held at its start.
enum Parsed {
    Head(UpstreamHead),
    /// A 1xx head, now skipped.
    Informational,
    /// Not a whole head yet.
    Partial,
}

/// Where the response body stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    /// No head read yet.
    Head,
    /// `Content-Length`: bytes still to come.
    Length(u64),
    /// Chunked transfer coding.
    Chunked(Chunk),
    /// No length: the body ends when the connection closes.
    UntilClose,
    /// The body is complete.
    Done,
}

/// One HTTP/1.1 exchange on an upstream connection.
pub(super) struct H1Upstream {
    stream: Stream,
    buf: BytesMut,
    body: Body,
    /// The connection may serve another request once the body is complete.
    keep_alive: bool,
    /// How long the upstream keeps an idle connection open (`Keep-Alive: timeout=N`).
    idle_limit: Option<Duration>,
    /// The request was HEAD: the response has no body whatever its head says.
    head_request: bool,
    read_timeout: Option<Duration>,
    /// Space offered to the next read.
    read_size: usize,
    /// Some byte of an answer arrived.
    answered: bool,
    /// The request was not written whole (the upstream may have answered early).
    request_cut: bool,
    /// When the request was written whole.
    sent_at: Option<tokio::time::Instant>,
}

impl H1Upstream {
    pub(super) fn new(stream: Stream, read_timeout: Option<Duration>) -> Self {
        H1Upstream {
            stream,
            buf: BytesMut::new(),
            body: Body::Head,
            keep_alive: true,
            idle_limit: None,
            head_request: false,
            read_timeout,
            read_size: FIRST_READ,
            answered: false,
            request_cut: false,
            sent_at: None,
        }
    }

    /// Writes the request head and body in one vectored write (more only if the kernel takes
    /// part of it).
    pub(super) async fn send(&mut self, req: &UpstreamRequest, body: &[u8]) -> Result<(), H1Error> {
        let head = request_head(req, body.len())?;
        self.head_request = req.method == "HEAD";
        // Until the request is out whole, the connection cannot serve another one.
        self.request_cut = true;
        let mut slices = [IoSlice::new(&head), IoSlice::new(body)];
        let mut rest: &mut [IoSlice<'_>] = &mut slices;
        while !rest.is_empty() {
            let n = self.stream.write_vectored(rest).await?;
            if n == 0 {
                return Err(H1Error::Closed("while the request was written"));
            }
            IoSlice::advance_slices(&mut rest, n);
        }
        self.stream.flush().await?;
        self.request_cut = false;
        self.sent_at = Some(tokio::time::Instant::now());
        Ok(())
    }

    /// Reads the response head, skipping 1xx informational heads.
    pub(super) async fn read_head(&mut self) -> Result<UpstreamHead, H1Error> {
        loop {
            match self.parse_head()? {
                Parsed::Head(head) => return Ok(head),
                Parsed::Informational => continue,
                Parsed::Partial => {}
            }
            // The head is awaited as long as the caller allows (the header timeout): a long
            // generation answered without streaming is silent until its head.
            if self.read_more(None).await? == 0 {
                return Err(H1Error::Closed("before its response head"));
            }
        }
    }

    /// Parses a head from the buffer.
    fn parse_head(&mut self) -> Result<Parsed, H1Error> {
        if self.buf.is_empty() {
            return Ok(Parsed::Partial);
        }
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut fields);
        // As lenient as Pingora's own client: `Name : value` and folded lines are accepted.
        let mut config = httparse::ParserConfig::default();
        config.allow_spaces_after_header_name_in_responses(true);
        config.allow_obsolete_multiline_headers_in_responses(true);
        let len = match config.parse_response(&mut parsed, &self.buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if self.buf.len() > MAX_HEAD => {
                return Err(H1Error::Malformed("response head too large"))
            }
            Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(H1Error::Malformed("too many header fields"))
            }
            Err(_) => return Err(H1Error::Malformed("invalid response head")),
        };
        let code = parsed.code.unwrap_or(0);
        let status =
            http::StatusCode::from_u16(code).map_err(|_| H1Error::Malformed("invalid status"))?;
        if code == 101 {
            return Err(H1Error::Malformed("unexpected protocol switch"));
        }
        if (100..200).contains(&code) {
            self.buf.advance(len);
            return Ok(Parsed::Informational);
        }
        let mut headers = http::HeaderMap::with_capacity(parsed.headers.len());
        let mut chunked = false;
        let mut coded = false;
        let mut length: Option<u64> = None;
        let http10 = parsed.version == Some(0);
        let mut close = http10;
        // One copy of the head, of its exact size, that the values point into (not the read
        // buffer, which the body goes on using); the head is dropped once written to the client.
        let head = HeadCopy::new(&self.buf, len);
        for field in parsed.headers.iter() {
            let name = header_name(field.name.as_bytes())
                .map_err(|_| H1Error::Malformed("invalid header name"))?;
            let value = if field.value.iter().any(|&b| b == b'\r' || b == b'\n') {
                // A folded line: each fold becomes spaces (RFC 9112 §5.2).
                let unfolded: Vec<u8> = field
                    .value
                    .iter()
                    .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b })
                    .collect();
                http::HeaderValue::from_bytes(&unfolded)
            } else {
                http::HeaderValue::from_maybe_shared(head.part(field.value))
            }
            .map_err(|_| H1Error::Malformed("invalid header value"))?;
            if name == http::header::TRANSFER_ENCODING {
                // `identity` (no coding; dropped from the registry) is ignored, as Pingora did,
                // so that a length beside it still frames the body.
                if field.value.split(|&b| b == b',').any(|t| {
                    let t = t.trim_ascii();
                    !t.is_empty() && !t.eq_ignore_ascii_case(b"identity")
                }) {
                    coded = true;
                    // Only the last coding decides (RFC 9112 §6.3).
                    chunked = last_token(field.value).eq_ignore_ascii_case(b"chunked");
                }
            } else if name == http::header::CONTENT_LENGTH {
                add_length(&mut length, field.value).map_err(H1Error::Malformed)?;
            } else if name == http::header::CONNECTION {
                close = !keeps_alive(field.value, http10, !close);
            } else if name == "keep-alive" {
                self.idle_limit = keep_alive_timeout(field.value);
            }
            headers.append(name, value);
        }
        self.buf.advance(len);
        if coded {
            // The coding frames the body; a length beside it is stale and must not reach the
            // client (RFC 9112 §6.3). Over HTTP/1.0 the framing is faulty: close afterwards.
            headers.remove(http::header::CONTENT_LENGTH);
            if http10 {
                close = true;
            }
        }
        self.keep_alive = !close;
        self.body = if self.head_request || code == 204 || code == 304 {
            Body::Done
        } else if coded {
            if chunked {
                Body::Chunked(Chunk::Size)
            } else {
                Body::UntilClose
            }
        } else if let Some(n) = length {
            Body::Length(n)
        } else {
            Body::UntilClose
        };
        if self.body == Body::UntilClose {
            self.keep_alive = false;
        }
        Ok(Parsed::Head(UpstreamHead { status, headers }))
    }

    /// The next piece of the response body, `None` at its end. Pieces are slices of the read
    /// buffer; whatever is already buffered is handed out without waiting.
    pub(super) async fn read_body(&mut self) -> Result<Option<Bytes>, H1Error> {
        loop {
            match self.body {
                Body::Head | Body::Done => return Ok(None),
                Body::Length(0) => {
                    self.body = Body::Done;
                    return Ok(None);
                }
                Body::Length(rest) => {
                    if self.buf.is_empty() && self.read_more(self.read_timeout).await? == 0 {
                        self.keep_alive = false;
                        return Err(H1Error::Closed("before the body was complete"));
                    }
                    let n = take_len(rest, self.buf.len());
                    self.body = Body::Length(rest - n as u64);
                    return Ok(Some(self.buf.split_to(n).freeze()));
                }
                Body::UntilClose => {
                    if self.buf.is_empty() && self.read_more(self.read_timeout).await? == 0 {
                        self.body = Body::Done;
                        return Ok(None);
                    }
                    return Ok(Some(self.buf.split().freeze()));
                }
                Body::Chunked(mut chunk) => {
                    let step = chunk.step(&mut self.buf).map_err(H1Error::Malformed)?;
                    self.body = Body::Chunked(chunk);
                    match step {
                        ChunkStep::Piece(piece) => return Ok(Some(piece.freeze())),
                        ChunkStep::Moved => {}
                        ChunkStep::End => self.body = Body::Done,
                        ChunkStep::NeedMore => {
                            if self.read_more(self.read_timeout).await? == 0 {
                                self.keep_alive = false;
                                return Err(H1Error::Closed("before the body was complete"));
                            }
                        }
                    }
                }
            }
        }
    }

    /// Bytes read from the socket and not yet handed out.
    pub(super) fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Appends to `out` the body bytes that are already buffered (chunk framing removed) until
    /// it holds at least `limit` bytes, without reading the socket: what [`H1Upstream::read_body`] would
    /// hand out now, in one copy instead of one piece each. `Ok(false)` when nothing was
    /// taken.
    pub(super) fn take_buffered(
        &mut self,
        out: &mut BytesMut,
        limit: usize,
    ) -> Result<bool, H1Error> {
        let start = (out.len(), self.buf.len());
        while out.len() < limit {
            match self.body {
                Body::Head | Body::Done => break,
                Body::Length(0) => {
                    self.body = Body::Done;
                    break;
                }
                Body::Length(rest) => {
                    if self.buf.is_empty() {
                        break;
                    }
                    let n = take_len(rest, self.buf.len());
                    out.extend_from_slice(&self.buf[..n]);
                    self.buf.advance(n);
                    self.body = Body::Length(rest - n as u64);
                }
                Body::UntilClose => {
                    if self.buf.is_empty() {
                        break;
                    }
                    out.extend_from_slice(&self.buf);
                    self.buf.clear();
                }
                Body::Chunked(mut chunk) => {
                    let step = chunk
                        .step_copy(&mut self.buf, out)
                        .map_err(H1Error::Malformed)?;
                    self.body = Body::Chunked(chunk);
                    match step {
                        ChunkStep::Moved | ChunkStep::Piece(_) => {}
                        ChunkStep::End => self.body = Body::Done,
                        ChunkStep::NeedMore => break,
                    }
                }
            }
        }
        Ok((out.len(), self.buf.len()) != start)
    }

    /// Whether the request may be sent again on another connection after `err`: only when the
    /// connection failed (closed, reset, refused the write) before any byte of an answer and
    /// at once (within [`RESEND_WINDOW`] of the request going out), the sign of a pooled
    /// connection the upstream had closed. A timeout, a broken answer or a late close means the
    /// upstream may be working on the request, and sending it again could run (and bill) it
    /// twice.
    pub(super) fn may_resend(&self, err: &H1Error) -> bool {
        !self.answered
            && matches!(err, H1Error::Closed(_) | H1Error::Io(_))
            && self.sent_at.is_none_or(|t| t.elapsed() < RESEND_WINDOW)
    }

    /// Whether the response body has been read to its end.
    pub(super) fn response_done(&self) -> bool {
        matches!(self.body, Body::Done | Body::Length(0))
    }

    /// The connection, if it can serve another request (the body read to its end, nothing
    /// unread behind it, neither side asked to close), with how long it may idle in the pool:
    /// `pool_idle`, or less when the upstream said it closes idle connections sooner.
    pub(super) fn into_reusable(self, pool_idle: Duration) -> Option<(Stream, Duration)> {
        if !(self.response_done() && self.keep_alive && self.buf.is_empty()) || self.request_cut {
            return None;
        }
        let idle = match self.idle_limit {
            // A second of margin: a connection the upstream is closing must not be picked.
            Some(limit) if limit <= Duration::from_secs(1) => return None,
            Some(limit) => pool_idle.min(limit - Duration::from_secs(1)),
            None => pool_idle,
        };
        Some((self.stream, idle))
    }

    /// Closes the connection.
    pub(super) async fn shutdown(mut self) {
        let _ = self.stream.shutdown().await;
    }

    /// Reads what the socket has into the buffer, waiting at most `limit`; 0 at the end of the
    /// stream.
    async fn read_more(&mut self, limit: Option<Duration>) -> Result<usize, H1Error> {
        if self.buf.capacity() - self.buf.len() < self.read_size / 2 {
            // Reuses the buffer in place when the pieces handed out are gone.
            self.buf.reserve(self.read_size);
        }
        let offered = self.buf.capacity() - self.buf.len();
        let read = self.stream.read_buf(&mut self.buf);
        let n = match limit {
            Some(t) => tokio::time::timeout(t, read)
                .await
                .map_err(|_| H1Error::Timeout)??,
            None => read.await?,
        };
        self.answered |= n > 0;
        if n == offered && self.read_size < MAX_READ {
            // More was waiting: offer more next time (large answers, fast upstreams).
            self.read_size *= 2;
        }
        Ok(n)
    }
}

/// The request line and header fields, with the body's length.
fn request_head(req: &UpstreamRequest, body_len: usize) -> Result<Vec<u8>, H1Error> {
    let target = req.path_and_query.as_bytes();
    // Visible ASCII only (RFC 9112 §3.2; other bytes arrive percent-encoded).
    if target.is_empty() || target.iter().any(|&b| b <= b' ' || b >= 0x7f) {
        return Err(H1Error::BadRequest("invalid request target"));
    }
    let fields: usize = req
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    let mut head = Vec::with_capacity(req.method.len() + target.len() + fields + 48);
    head.extend_from_slice(req.method.as_bytes());
    head.push(b' ');
    head.extend_from_slice(target);
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &req.headers {
        // The framing is this client's: a length or coding from a header rule must not go out
        // beside the length written below.
        if name == http::header::CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    // Writing to a Vec cannot fail.
    let _ = write!(head, "content-length: {body_len}\r\n\r\n");
    Ok(head)
}

/// `timeout=N` of a `Keep-Alive` header (RFC 2068 §19.7.1.1), in seconds.
fn keep_alive_timeout(value: &[u8]) -> Option<Duration> {
    value.split(|&b| b == b',').find_map(|param| {
        let eq = param.iter().position(|&b| b == b'=')?;
        let (name, secs) = (&param[..eq], &param[eq + 1..]);
        if !name.trim_ascii().eq_ignore_ascii_case(b"timeout") {
            return None;
        }
        let secs = std::str::from_utf8(secs.trim_ascii()).ok()?.parse().ok()?;
        Some(Duration::from_secs(secs))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing unwrap is a failing test
mod tests {
    use super::*;
    use tokio_test::io::Builder;

    const POOL_IDLE: Duration = Duration::from_secs(60);

    /// An exchange whose socket hands out `reads`, one read each.
    fn upstream(reads: &[&[u8]]) -> H1Upstream {
        let mut mock = Builder::new();
        for r in reads {
            mock.read(r);
        }
        H1Upstream::new(Box::new(mock.build()), None)
    }

    /// Reads the head and the whole body.
    async fn exchange(up: &mut H1Upstream) -> Result<(u16, Vec<u8>), H1Error> {
        let head = up.read_head().await?;
        let mut body = Vec::new();
        while let Some(piece) = up.read_body().await? {
            assert!(!piece.is_empty(), "empty pieces are never handed out");
            body.extend_from_slice(&piece);
        }
        assert!(up.response_done());
        Ok((head.status.as_u16(), body))
    }

    /// Every way of cutting `wire` in two reads, and one byte per read.
    fn cuts(wire: &[u8]) -> Vec<Vec<&[u8]>> {
        let mut all: Vec<Vec<&[u8]>> = (0..=wire.len())
            .map(|k| vec![&wire[..k], &wire[k..]])
            .collect();
        all.push(wire.chunks(1).collect());
        all
    }

    const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
        transfer-encoding: chunked\r\n\r\n5;name=value\r\nhello\r\n1A\r\n\
        abcdefghijklmnopqrstuvwxyz\r\n0\r\nx-trailer: 1\r\n\r\n";

    #[tokio::test]
    async fn chunked_body_decoded_however_the_bytes_arrive() {
        for reads in cuts(CHUNKED) {
            let mut up = upstream(&reads);
            let (status, body) = exchange(&mut up).await.unwrap();
            assert_eq!(status, 200);
            assert_eq!(body, b"helloabcdefghijklmnopqrstuvwxyz");
            assert!(up.into_reusable(POOL_IDLE).is_some());
        }
    }

    #[tokio::test]
    async fn buffered_body_bytes_taken_at_once_match_the_pieces() {
        let length: &[u8] =
            b"HTTP/1.1 200 OK\r\ncontent-length: 31\r\n\r\nhelloabcdefghijklmnopqrstuvwxyz";
        let until_close: &[u8] = b"HTTP/1.1 200 OK\r\n\r\nhelloabcdefghijklmnopqrstuvwxyz";
        for (wire, reusable) in [(CHUNKED, true), (length, true), (until_close, false)] {
            for reads in cuts(wire) {
                let mut up = upstream(&reads);
                up.read_head().await.unwrap();
                let mut out = BytesMut::new();
                let mut taken = false;
                loop {
                    if up.buffered() > 0 && up.take_buffered(&mut out, 1 << 20).unwrap() {
                        taken = true;
                        continue;
                    }
                    if up.response_done() {
                        break;
                    }
                    match up.read_body().await.unwrap() {
                        Some(piece) => out.extend_from_slice(&piece),
                        None => break,
                    }
                }
                assert_eq!(&out[..], b"helloabcdefghijklmnopqrstuvwxyz", "{reads:?}");
                assert!(up.response_done());
                assert_eq!(up.into_reusable(POOL_IDLE).is_some(), reusable, "{reads:?}");
                // Whatever came with the head is taken without a read.
                if reads.len() == 2 && reads[0].len() > wire.len() - 20 && wire != until_close {
                    assert!(taken, "{reads:?}");
                }
            }
        }
        // It stops once the limit is reached, a piece at a time, and goes on from there.
        let mut up = upstream(&[CHUNKED]);
        up.read_head().await.unwrap();
        let mut out = BytesMut::new();
        assert!(up.take_buffered(&mut out, 3).unwrap());
        assert_eq!(&out[..], b"hello");
        assert!(!up.response_done());
        assert!(up.take_buffered(&mut out, 1 << 20).unwrap());
        assert_eq!(&out[..], b"helloabcdefghijklmnopqrstuvwxyz");
        assert!(up.response_done());
        assert!(!up.take_buffered(&mut out, 1 << 20).unwrap());
        // Broken framing is an error here as in the pieces.
        let mut up = upstream(&[b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"]);
        up.read_head().await.unwrap();
        assert!(up.take_buffered(&mut BytesMut::new(), 1 << 20).is_err());
    }

    #[tokio::test]
    async fn chunked_pieces_are_handed_out_before_the_chunk_is_complete() {
        let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nA\r\n0123";
        let mut mock = Builder::new();
        mock.read(head);
        // The rest never comes: the first piece must not wait for it.
        mock.wait(Duration::from_secs(3600));
        let mut up = H1Upstream::new(Box::new(mock.build()), None);
        up.read_head().await.unwrap();
        let first = up.read_body().await.unwrap().unwrap();
        assert_eq!(&first[..], b"0123");
        assert!(!up.response_done());
    }

    #[tokio::test]
    async fn content_length_body_however_the_bytes_arrive() {
        let wire = b"HTTP/1.1 201 Created\r\nContent-Length: 11\r\nX-A: b\r\n\r\nhello world";
        for reads in cuts(wire) {
            let mut up = upstream(&reads);
            let (status, body) = exchange(&mut up).await.unwrap();
            assert_eq!((status, &body[..]), (201, &b"hello world"[..]));
            assert!(up.into_reusable(POOL_IDLE).is_some());
        }
    }

    #[tokio::test]
    async fn reads_grow_while_they_fill_the_space_offered() {
        let body: Vec<u8> = (0..200 * 1024).map(|i| (i % 251) as u8).collect();
        let mut wire =
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
        wire.extend_from_slice(&body);
        let mut up = upstream(&[&wire]);
        assert_eq!(up.read_size, FIRST_READ);
        assert_eq!(exchange(&mut up).await.unwrap().1, body);
        assert_eq!(up.read_size, MAX_READ);
        // Small answers keep the first size.
        let mut up = upstream(&[b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]);
        exchange(&mut up).await.unwrap();
        assert_eq!(up.read_size, FIRST_READ);
    }

    #[tokio::test]
    async fn header_fields_kept_in_order_with_repeats() {
        let wire = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nx-a: 1\r\nx-a: 2\r\n\
            content-length: 0\r\n\r\n";
        let mut up = upstream(&[wire]);
        let head = up.read_head().await.unwrap();
        assert_eq!(head.status.as_u16(), 429);
        assert_eq!(head.headers.get("retry-after").unwrap(), "7");
        let a: Vec<_> = head.headers.get_all("x-a").iter().collect();
        assert_eq!(a, ["1", "2"]);
        assert!(up.read_body().await.unwrap().is_none());
        assert!(up.into_reusable(POOL_IDLE).is_some());
    }

    #[tokio::test]
    async fn lenient_where_pingora_was_spaces_before_colon_and_folded_lines() {
        let wire = b"HTTP/1.1 200 OK\r\nx-a : 1\r\nx-folded: first\r\n  second\r\n\
            content-length: 2\r\n\r\nok";
        let mut up = upstream(&[wire]);
        let head = up.read_head().await.unwrap();
        assert_eq!(head.headers.get("x-a").unwrap(), "1");
        let folded = head.headers.get("x-folded").unwrap().to_str().unwrap();
        assert!(
            folded.starts_with("first") && folded.ends_with("second"),
            "{folded}"
        );
        assert!(!folded.contains('\r') && !folded.contains('\n'));
        assert_eq!(up.read_body().await.unwrap().unwrap(), &b"ok"[..]);
    }

    #[tokio::test]
    async fn body_without_length_ends_with_the_connection() {
        let wire = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{\"a\":1}";
        for reads in cuts(wire) {
            let mut up = upstream(&reads);
            let (_, body) = exchange(&mut up).await.unwrap();
            assert_eq!(body, b"{\"a\":1}");
            assert!(
                up.into_reusable(POOL_IDLE).is_none(),
                "the end was the close"
            );
        }
        // A coding other than chunked last: also delimited by the close.
        let wire = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\nraw";
        let mut up = upstream(&[wire]);
        assert_eq!(exchange(&mut up).await.unwrap().1, b"raw");
        assert!(up.into_reusable(POOL_IDLE).is_none());
    }

    #[tokio::test]
    async fn chunked_wins_over_content_length_when_last() {
        let wire =
            b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\ntransfer-encoding: gzip, Chunked\r\n\r\n\
            2\r\nok\r\n0\r\n\r\n";
        let mut up = upstream(&[wire]);
        let head = up.read_head().await.unwrap();
        // The stale length is not passed on.
        assert!(head.headers.get("content-length").is_none());
        assert_eq!(up.read_body().await.unwrap().unwrap(), &b"ok"[..]);
        assert!(up.read_body().await.unwrap().is_none());
        assert!(up.into_reusable(POOL_IDLE).is_some());
        // HTTP/1.0 with a transfer coding: faulty framing, the connection is not reused.
        let wire =
            b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n\
            2\r\nok\r\n0\r\n\r\n";
        let mut up = upstream(&[wire]);
        assert_eq!(exchange(&mut up).await.unwrap().1, b"ok");
        assert!(up.into_reusable(POOL_IDLE).is_none());
    }

    #[tokio::test]
    async fn only_a_connection_that_failed_before_any_answer_may_resend() {
        let mut up = upstream(&[b""]);
        let err = up.read_head().await.err().unwrap();
        assert!(
            up.may_resend(&err),
            "closed before any byte: a stale pooled connection"
        );
        let mut up = upstream(&[b"HTTP/1.1 200 OK\r\ncontent-le"]);
        let err = up.read_head().await.err().unwrap();
        assert!(!up.may_resend(&err), "part of an answer came");
        let mut up = upstream(&[b"HTTP/1.1 2000 Huh\r\n\r\n"]);
        let err = up.read_head().await.err().unwrap();
        assert!(!up.may_resend(&err));
        let up = upstream(&[]);
        assert!(
            !up.may_resend(&H1Error::Timeout),
            "the upstream may be working on it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_close_long_after_the_request_went_out_is_not_resent() {
        for (wait, resend) in [(Duration::ZERO, true), (Duration::from_secs(30), false)] {
            let mock = Builder::new()
                .write(b"POST /v1/messages HTTP/1.1\r\nhost: up.example\r\nx-api-key: k\r\ncontent-length: 2\r\n\r\n")
                .write(b"{}")
                .wait(wait)
                .read(b"")
                .build();
            let mut up = H1Upstream::new(Box::new(mock), None);
            up.send(&request("/v1/messages"), b"{}").await.unwrap();
            let err = up.read_head().await.err().unwrap();
            assert!(matches!(err, H1Error::Closed(_)));
            assert_eq!(up.may_resend(&err), resend, "closed after {wait:?}");
        }
    }

    #[tokio::test]
    async fn the_head_is_awaited_beyond_the_read_timeout() {
        let mut mock = Builder::new();
        mock.wait(Duration::from_millis(100));
        mock.read(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
        let mut up = H1Upstream::new(Box::new(mock.build()), Some(Duration::from_millis(20)));
        // The caller bounds the head with its header timeout; the read timeout (20 ms) is for
        // silences inside the body (`a_silent_upstream_times_out`).
        assert_eq!(exchange(&mut up).await.unwrap(), (200, b"ok".to_vec()));
    }

    #[tokio::test]
    async fn identity_is_no_coding_and_bare_lf_ends_chunk_data() {
        let wire = b"HTTP/1.1 200 OK\r\ntransfer-encoding: identity\r\ncontent-length: 2\r\n\r\nok";
        let mut up = upstream(&[wire]);
        assert_eq!(exchange(&mut up).await.unwrap().1, b"ok");
        assert!(
            up.into_reusable(POOL_IDLE).is_some(),
            "framed by its length"
        );
        let wire = b"HTTP/1.1 200 OK\ntransfer-encoding: chunked\n\n2\nok\n1\r\n!\n0\n\n";
        for reads in cuts(wire) {
            let mut up = upstream(&reads);
            assert_eq!(exchange(&mut up).await.unwrap().1, b"ok!");
        }
    }

    #[tokio::test]
    async fn informational_heads_are_skipped() {
        let wire = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
            HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        for reads in cuts(wire) {
            let mut up = upstream(&reads);
            assert_eq!(exchange(&mut up).await.unwrap(), (200, b"ok".to_vec()));
        }
    }

    #[tokio::test]
    async fn no_body_after_head_204_and_304() {
        for wire in [
            &b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n"[..],
            &b"HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n"[..],
        ] {
            let mut up = upstream(&[wire]);
            assert!(exchange(&mut up).await.unwrap().1.is_empty());
            assert!(up.into_reusable(POOL_IDLE).is_some());
        }
        let mut up = upstream(&[b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"]);
        up.head_request = true;
        assert!(exchange(&mut up).await.unwrap().1.is_empty());
    }

    #[tokio::test]
    async fn connection_close_and_http_1_0_are_not_reused() {
        for wire in [
            &b"HTTP/1.1 200 OK\r\nconnection: keep-alive, Close\r\ncontent-length: 1\r\n\r\nx"[..],
            &b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\nx"[..],
        ] {
            let mut up = upstream(&[wire]);
            exchange(&mut up).await.unwrap();
            assert!(up.into_reusable(POOL_IDLE).is_none());
        }
        let mut up =
            upstream(&[b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\nx"]);
        exchange(&mut up).await.unwrap();
        assert!(up.into_reusable(POOL_IDLE).is_some());
    }

    #[tokio::test]
    async fn the_upstream_idle_limit_shortens_the_pool_stay() {
        let cases: [(&[u8], Option<u64>); 4] = [
            (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", Some(60)),
            (
                b"HTTP/1.1 200 OK\r\nkeep-alive: timeout=5, max=100\r\ncontent-length: 0\r\n\r\n",
                Some(4),
            ),
            (
                b"HTTP/1.1 200 OK\r\nKeep-Alive: max=9, Timeout = 600\r\ncontent-length: 0\r\n\r\n",
                Some(60),
            ),
            (
                b"HTTP/1.1 200 OK\r\nkeep-alive: timeout=1\r\ncontent-length: 0\r\n\r\n",
                None,
            ),
        ];
        for (wire, idle) in cases {
            let mut up = upstream(&[wire]);
            exchange(&mut up).await.unwrap();
            let got = up.into_reusable(POOL_IDLE).map(|(_, d)| d.as_secs());
            assert_eq!(got, idle, "{:?}", String::from_utf8_lossy(wire));
        }
    }

    #[tokio::test]
    async fn bytes_past_the_body_make_the_connection_unusable() {
        let mut up = upstream(&[b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nxGARBAGE"]);
        assert_eq!(exchange(&mut up).await.unwrap().1, b"x");
        assert!(up.into_reusable(POOL_IDLE).is_none());
    }

    #[tokio::test]
    async fn early_close_is_an_error_not_an_end() {
        let cases: [&[u8]; 4] = [
            b"",
            b"HTTP/1.1 200 OK\r\ncontent-le",
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel",
        ];
        for wire in cases {
            let mut up = upstream(&[wire]);
            let err = exchange(&mut up).await.unwrap_err();
            assert!(matches!(err, H1Error::Closed(_)), "{err} for {wire:?}");
            assert!(up.into_reusable(POOL_IDLE).is_none());
        }
    }

    #[tokio::test]
    async fn malformed_answers_are_errors() {
        let cases: [&[u8]; 8] = [
            b"SMTP ready\r\n\r\n",
            b"HTTP/1.1 2000 Huh\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nokXX0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1000000000000000\r\n",
        ];
        for wire in cases {
            let mut up = upstream(&[wire]);
            let err = exchange(&mut up).await.unwrap_err();
            assert!(matches!(err, H1Error::Malformed(_)), "{err} for {wire:?}");
        }
        // An endless head.
        let big = [b'a'; 1024];
        let mut reads: Vec<&[u8]> = vec![b"HTTP/1.1 200 OK\r\nx: "];
        reads.extend(std::iter::repeat_n(&big[..], 64));
        let mut up = upstream(&reads);
        let err = up.read_head().await.err().unwrap();
        assert!(matches!(err, H1Error::Malformed("response head too large")));
    }

    #[tokio::test]
    async fn a_silent_upstream_times_out() {
        let mut mock = Builder::new();
        mock.read(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
        mock.wait(Duration::from_secs(3600));
        let mut up = H1Upstream::new(Box::new(mock.build()), Some(Duration::from_millis(20)));
        up.read_head().await.unwrap();
        assert!(matches!(up.read_body().await, Err(H1Error::Timeout)));
    }

    fn request(path: &str) -> UpstreamRequest {
        UpstreamRequest {
            tls: false,
            host: "127.0.0.1".into(),
            port: 9,
            method: "POST",
            path_and_query: path.into(),
            headers: vec![
                (
                    http::header::HOST,
                    http::HeaderValue::from_static("up.example"),
                ),
                (
                    http::HeaderName::from_static("x-api-key"),
                    http::HeaderValue::from_static("k"),
                ),
            ],
            body: None,
        }
    }

    #[tokio::test]
    async fn request_goes_out_as_head_then_body() {
        let mock = Builder::new()
            .write(b"POST /v1/messages?beta=true HTTP/1.1\r\nhost: up.example\r\nx-api-key: k\r\ncontent-length: 4\r\n\r\n")
            .write(b"{}{}")
            .read(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .build();
        let mut up = H1Upstream::new(Box::new(mock), None);
        // Framing fields a header rule may have added are not sent: the length is the body's.
        let mut req = request("/v1/messages?beta=true");
        req.headers.push((
            http::header::CONTENT_LENGTH,
            http::HeaderValue::from_static("999"),
        ));
        req.headers.push((
            http::header::TRANSFER_ENCODING,
            http::HeaderValue::from_static("chunked"),
        ));
        up.send(&req, b"{}{}").await.unwrap();
        assert_eq!(exchange(&mut up).await.unwrap(), (200, vec![]));
    }

    #[tokio::test]
    async fn an_answer_after_a_failed_write_is_read_but_never_pooled() {
        let mock = Builder::new()
            .write_error(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            .read(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 2\r\n\r\nno")
            .build();
        let mut up = H1Upstream::new(Box::new(mock), None);
        let err = up.send(&request("/v1/messages"), b"{}").await.unwrap_err();
        assert!(matches!(err, H1Error::Io(_)));
        assert_eq!(exchange(&mut up).await.unwrap(), (413, b"no".to_vec()));
        assert!(up.into_reusable(POOL_IDLE).is_none());
    }

    #[tokio::test]
    async fn a_target_that_would_split_the_request_line_is_refused() {
        for path in ["", "/a b", "/a\r\nx: y", "/\u{7f}", "/caf\u{e9}"] {
            let mut up = upstream(&[]);
            let err = up.send(&request(path), b"").await.unwrap_err();
            assert!(matches!(err, H1Error::BadRequest(_)), "{path:?}");
        }
    }
}
