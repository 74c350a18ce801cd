//! The relay's HTTP/1.1 server side of a client connection, over the streams the proxy's
//! listening service accepts (Pingora's stream types, TLS acceptor, runtime and shutdown are
//! kept).
//!
//! Pingora's server session keeps, for as long as a request lasts, the 4 KiB buffer its request
//! head was read into (the header values point into it), and writes through the connection's
//! write buffer (8 KiB here) so that a head and a short answer leave together; a streamed
//! answer's head, each body write and the last chunk are flushed on their own. Held by every open
//! stream, those buffers were a third of its memory. This side keeps only a copy of the head's
//! bytes (header values point into it), frees its read buffer whenever nothing is left in it,
//! and has no write buffer: the answer's head, chunk framing and body pieces are queued as
//! pieces and leave in one vectored write when the caller flushes (before it waits for the
//! upstream), when an answer ends, or when 16 KiB are queued.
//!
//! Framing follows RFC 9112: a request body is framed by `Transfer-Encoding` (chunked must be the
//! last coding, else 400), or `Content-Length` (differing values are 400), or has none; a request
//! with both is read as chunked and the connection closed afterwards. An answer is framed by its
//! `Content-Length`, or chunked to an HTTP/1.1 client, or ends with the connection for an
//! HTTP/1.0 one; HEAD, 1xx, 204 and 304 answers have no body.

use std::cell::RefCell;
use std::io::IoSlice;
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use pingora::http::ResponseHeader;
use pingora::protocols::Stream;
use pingora::{Error, ErrorType};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::h1::{add_length, keeps_alive, parse_length, take_len, Chunk, ChunkStep, HeadCopy};
use super::header_names::header_name;

/// Space offered to a read of a request head or a chunked body.
const READ_SIZE: usize = 4 * 1024;
/// Largest request head accepted (real clients send 1 to 4 KiB).
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a request head.
const MAX_HEADERS: usize = 128;
/// Queued answer bytes that go out without waiting for a flush.
const WRITE_AHEAD: usize = 16 * 1024;
/// Slices handed to one vectored write, and queued pieces that go out without waiting.
const MAX_IOV: usize = 32;
/// First space for a request body; it doubles up to the announced length.
const BODY_FIRST: usize = 64 * 1024;
/// Most bytes of chunked-body trailer lines accepted.
const MAX_TRAILERS: usize = 8 * 1024;
/// How long, and how much, a client's unread request is read and dropped before its connection
/// is closed.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 64 << 20;

/// A request head: method, target, version and header fields (names lower-case, order kept).
#[derive(Debug, Default)]
pub(super) struct RequestHead {
    pub method: http::Method,
    pub uri: http::Uri,
    pub version: http::Version,
    pub headers: http::HeaderMap,
}

/// Why no request head could be read.
#[derive(Debug)]
pub(super) enum HeadError {
    /// Not HTTP/1.x as RFC 9112 frames a request: answered 400.
    Bad(&'static str),
    /// Longer than the relay takes: answered 431.
    TooLarge,
    /// A transfer coding other than chunked: answered 501.
    Unsupported,
    /// The client went away or stalled mid-head: nothing to answer.
    Gone(String),
}

impl std::fmt::Display for HeadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeadError::Bad(what) => write!(f, "unreadable request head: {what}"),
            HeadError::TooLarge => f.write_str("request head too large"),
            HeadError::Unsupported => f.write_str("unsupported transfer coding"),
            HeadError::Gone(why) => {
                write!(f, "client connection failed before a request head: {why}")
            }
        }
    }
}

/// Where the request body stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReqBody {
    /// Read to its end (or there is none).
    Done,
    /// `Content-Length`: bytes still to come.
    Length(u64),
    /// Chunked transfer coding.
    Chunked(Chunk),
}

/// How the answer's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RespBody {
    /// No head written yet.
    NotStarted,
    /// HEAD, 204, 304: the head is all.
    Empty,
    /// `Content-Length`: bytes still to go.
    Length(u64),
    Chunked,
    /// Ends with the connection (HTTP/1.0 client, no length).
    UntilClose,
}

/// A queued piece of the answer.
enum Piece {
    Data(Bytes),
    /// Chunk framing: the CRLF ending the previous chunk, a size line, or the last chunk.
    Frame([u8; 24], u8),
}

impl Piece {
    fn bytes(&self) -> &[u8] {
        match self {
            Piece::Data(b) => b,
            Piece::Frame(buf, len) => &buf[..*len as usize],
        }
    }
}

/// An error of the client side, for the connection loop to classify (the source is the client).
fn down(etype: ErrorType, what: &'static str) -> Box<Error> {
    let mut e = Error::explain(etype, what);
    e.as_down();
    e
}

/// The outcome of a read of the request body, as the connection loop answers it: a close
/// before the end is the client's, a timeout 408.
fn body_read(read: std::io::Result<usize>) -> pingora::Result<usize> {
    match read {
        Ok(0) => Err(down(
            ErrorType::ConnectionClosed,
            "client closed the connection before the body was complete",
        )),
        Ok(n) => Ok(n),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Err(down(
            ErrorType::HTTPStatus(408),
            "the request body did not arrive in time",
        )),
        Err(e) => Err(Error::because(
            ErrorType::ReadError,
            "reading the request body",
            e,
        )),
    }
}

/// One client connection, one request at a time.
pub(super) struct Downstream {
    stream: Stream,
    /// Bytes read and not yet taken (a head being read, body bytes that came with it, the next
    /// request of a pipelining client). Freed whenever it is empty.
    buf: BytesMut,
    req: RequestHead,
    body: ReqBody,
    keep_alive: bool,
    resp: RespBody,
    /// The answer was given whole (its end written).
    resp_done: bool,
    /// A chunk was written whose CRLF is still owed.
    open_chunk: bool,
    out: Vec<Piece>,
    out_len: usize,
    /// Longest wait for the next request, and for each read within one.
    read_timeout: Duration,
}

impl Downstream {
    pub(super) fn new(stream: Stream, read_timeout: Duration) -> Self {
        Downstream {
            stream,
            buf: BytesMut::new(),
            req: RequestHead::default(),
            body: ReqBody::Done,
            keep_alive: true,
            resp: RespBody::NotStarted,
            resp_done: false,
            open_chunk: false,
            out: Vec::new(),
            out_len: 0,
            read_timeout,
        }
    }

    /// The request whose head was read last.
    pub(super) fn req_header(&self) -> &RequestHead {
        &self.req
    }

    /// Drops the request's header fields and target (method and version stay, for framing the
    /// answer): an answer streamed for minutes need not hold them.
    pub(super) fn forget_request_fields(&mut self) {
        self.req.headers = http::HeaderMap::new();
        self.req.uri = http::Uri::default();
    }

    /// Whether the connection is to serve another request after this one.
    #[cfg(test)]
    fn keep_alive(&self) -> bool {
        self.keep_alive
    }

    pub(super) fn set_keep_alive(&mut self, keep: bool) {
        self.keep_alive &= keep;
    }

    /// Whether any of the answer was written (or queued).
    pub(super) fn response_written(&self) -> bool {
        self.resp != RespBody::NotStarted
    }

    /// Reads the next request head. `Ok(false)`: the client closed the connection, or let it
    /// idle past the read timeout, between requests.
    pub(super) async fn read_request(&mut self) -> Result<bool, HeadError> {
        self.req = RequestHead::default();
        self.body = ReqBody::Done;
        self.resp = RespBody::NotStarted;
        self.resp_done = false;
        self.open_chunk = false;
        self.drop_queue();
        // A head must be whole within the read timeout of its first byte (a client trickling
        // one byte at a time is dropped), and is parsed again only when a line end came in.
        let mut deadline = None;
        let mut parse = !self.buf.is_empty();
        loop {
            if parse && self.parse_head()? {
                return Ok(true);
            }
            let idle = self.buf.is_empty();
            if !idle && deadline.is_none() {
                deadline = Some(tokio::time::Instant::now() + self.read_timeout);
            }
            let before = self.buf.len();
            match self.read_more(deadline).await {
                Ok(0) if idle => return Ok(false),
                Ok(0) => return Err(HeadError::Gone("closed mid-head".into())),
                Ok(_) => {
                    parse = self.buf.len() > MAX_HEAD
                        || memchr::memchr(b'\n', &self.buf[before..]).is_some();
                }
                Err(_) if idle => return Ok(false),
                Err(e) => return Err(HeadError::Gone(e.to_string())),
            }
        }
    }

    /// Parses a head from the buffer; `false` if it is not whole yet.
    fn parse_head(&mut self) -> Result<bool, HeadError> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut fields);
        let len = match parsed.parse(&self.buf) {
            Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => {
                return Err(HeadError::TooLarge)
            }
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if self.buf.len() > MAX_HEAD => {
                return Err(HeadError::TooLarge)
            }
            Ok(httparse::Status::Partial) => return Ok(false),
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
            Err(_) => return Err(HeadError::Bad("invalid request head")),
        };
        // The head's own copy, of its exact size: header values and the target point into it,
        // and the read buffer can go.
        let head = HeadCopy::new(&self.buf, len);
        let part = |s: &[u8]| head.part(s);
        let method = http::Method::from_bytes(parsed.method.unwrap_or_default().as_bytes())
            .map_err(|_| HeadError::Bad("invalid method"))?;
        let uri = http::Uri::from_maybe_shared(part(parsed.path.unwrap_or_default().as_bytes()))
            .map_err(|_| HeadError::Bad("invalid request target"))?;
        let http10 = parsed.version == Some(0);
        let mut headers = http::HeaderMap::with_capacity(parsed.headers.len());
        let mut keep_alive = !http10;
        let mut length: Option<u64> = None;
        // Transfer codings over all `Transfer-Encoding` lines, in order.
        let (mut codings, mut chunked, mut chunked_last) = (0, 0, false);
        let mut hosts = 0;
        for field in parsed.headers.iter() {
            let name = header_name(field.name.as_bytes())
                .map_err(|_| HeadError::Bad("invalid header name"))?;
            let value = http::HeaderValue::from_maybe_shared(part(field.value))
                .map_err(|_| HeadError::Bad("invalid header value"))?;
            if name == http::header::TRANSFER_ENCODING {
                for t in field.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if t.is_empty() {
                        continue;
                    }
                    codings += 1;
                    chunked_last = t.eq_ignore_ascii_case(b"chunked");
                    chunked += usize::from(chunked_last);
                }
            } else if name == http::header::CONTENT_LENGTH {
                add_length(&mut length, field.value).map_err(HeadError::Bad)?;
            } else if name == http::header::CONNECTION {
                keep_alive = keeps_alive(field.value, http10, keep_alive);
            } else if name == http::header::HOST {
                hosts += 1;
                if !valid_host(field.value) {
                    return Err(HeadError::Bad("invalid Host"));
                }
            }
            headers.append(name, value);
        }
        // RFC 9112 §3.2: an HTTP/1.1 request names its host exactly once; HTTP/1.0 may omit it.
        if hosts > 1 || (hosts == 0 && !http10) {
            return Err(HeadError::Bad("a request needs exactly one Host"));
        }
        // The relay reads bodies as JSON: chunked, once and alone, is the only coding it takes
        // (RFC 9112 §6.1: others are answered 501; chunked must come last and only once).
        if codings > 0 && !(codings == 1 && chunked == 1 && chunked_last) {
            return Err(HeadError::Unsupported);
        }
        let coded = codings > 0;
        if coded && http10 {
            // Faulty framing for HTTP/1.0 (RFC 9112 §6.1): read it, then close.
            keep_alive = false;
        }
        self.body = if coded {
            if length.is_some() {
                // Both framings: the coding wins, and the connection is not trusted further.
                headers.remove(http::header::CONTENT_LENGTH);
                keep_alive = false;
            }
            ReqBody::Chunked(Chunk::Size)
        } else {
            match length {
                Some(n) if n > 0 => ReqBody::Length(n),
                _ => ReqBody::Done,
            }
        };
        self.req = RequestHead {
            method,
            uri,
            version: if http10 {
                http::Version::HTTP_10
            } else {
                http::Version::HTTP_11
            },
            headers,
        };
        self.keep_alive = keep_alive;
        self.buf.advance(len);
        self.release_buf();
        Ok(true)
    }

    /// Lets go of the read buffer's memory when nothing is left in it. An empty buffer can
    /// still share the allocation of a body split off it (with no room left, its capacity is
    /// zero): it is dropped all the same, so the body's memory goes when the body does.
    fn release_buf(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }

    /// Reads what the socket has into the buffer, waiting at most until `deadline`, or the
    /// read timeout without one.
    async fn read_more(
        &mut self,
        deadline: Option<tokio::time::Instant>,
    ) -> std::io::Result<usize> {
        let deadline = deadline.unwrap_or_else(|| tokio::time::Instant::now() + self.read_timeout);
        let read = if self.buf.is_empty() {
            // Nothing buffered (between requests, mostly): the read lands in a buffer on the
            // stack of the poll and is copied out when bytes come, so a connection idling in
            // keep-alive holds no read buffer.
            let (stream, buf) = (&mut self.stream, &mut self.buf);
            tokio::time::timeout_at(
                deadline,
                std::future::poll_fn(|cx| {
                    let mut room = [std::mem::MaybeUninit::<u8>::uninit(); READ_SIZE];
                    let mut read = tokio::io::ReadBuf::uninit(&mut room);
                    match std::pin::Pin::new(&mut *stream).poll_read(cx, &mut read) {
                        Poll::Ready(Ok(())) => {
                            buf.extend_from_slice(read.filled());
                            Poll::Ready(Ok(read.filled().len()))
                        }
                        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                        Poll::Pending => Poll::Pending,
                    }
                }),
            )
            .await
        } else {
            if self.buf.capacity() - self.buf.len() < READ_SIZE / 2 {
                self.buf.reserve(READ_SIZE);
            }
            tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await
        };
        match read {
            Ok(r) => r,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }

    /// Reads the whole request body; `Ok(None)` when it is larger than `max` bytes (the rest is
    /// left unread and the connection will not be reused).
    pub(super) async fn read_body(&mut self, max: usize) -> pingora::Result<Option<Bytes>> {
        let read = match self.body {
            ReqBody::Done => return Ok(Some(Bytes::new())),
            ReqBody::Length(n) if n > max as u64 => Ok(None),
            ReqBody::Length(n) => self.read_sized(n as usize).await.map(Some),
            ReqBody::Chunked(_) => self.read_chunked(max).await,
        };
        if matches!(read, Ok(Some(_))) {
            self.body = ReqBody::Done;
            self.release_buf();
        } else {
            self.keep_alive = false;
        }
        read
    }

    /// A body of `n` bytes: what came with the head, then reads straight into its buffer.
    async fn read_sized(&mut self, n: usize) -> pingora::Result<Bytes> {
        if self.buf.len() >= n {
            return Ok(self.buf.split_to(n).freeze());
        }
        // Room grows with what arrives: an announced length reserves nothing yet.
        let mut body = BytesMut::with_capacity(n.min(BODY_FIRST.max(self.buf.len())));
        body.extend_from_slice(&self.buf);
        self.buf = BytesMut::new();
        while body.len() < n {
            if body.len() == body.capacity() {
                body.reserve((n - body.len()).min(body.capacity().max(BODY_FIRST)));
            }
            let mut limited = (&mut self.stream).take((n - body.len()) as u64);
            let read = tokio::time::timeout(self.read_timeout, limited.read_buf(&mut body))
                .await
                .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
            body_read(read)?;
        }
        Ok(body.freeze())
    }

    /// A chunked body, decoded; `None` once it would pass `max` bytes.
    async fn read_chunked(&mut self, max: usize) -> pingora::Result<Option<Bytes>> {
        let mut body = BytesMut::new();
        let mut trailers = 0usize;
        loop {
            let ReqBody::Chunked(mut chunk) = self.body else {
                return Ok(Some(body.freeze()));
            };
            let (was, before) = (chunk, self.buf.len());
            let step = chunk
                .step(&mut self.buf)
                .map_err(|what| down(ErrorType::InvalidHTTPHeader, what))?;
            self.body = ReqBody::Chunked(chunk);
            match step {
                ChunkStep::Piece(piece) => body.extend_from_slice(&piece),
                ChunkStep::Moved => match (was, chunk) {
                    (Chunk::Size, Chunk::Data(size)) if body.len() as u64 + size > max as u64 => {
                        return Ok(None)
                    }
                    (Chunk::Trailers, _) => {
                        trailers += before - self.buf.len();
                        if trailers > MAX_TRAILERS {
                            return Err(down(
                                ErrorType::InvalidHTTPHeader,
                                "chunked body trailers too large",
                            ));
                        }
                    }
                    _ => {}
                },
                ChunkStep::End => self.body = ReqBody::Done,
                ChunkStep::NeedMore => {
                    let read = self.read_more(None).await;
                    body_read(read)?;
                }
            }
        }
    }

    /// Tells an HTTP/1.1 client waiting on `Expect: 100-continue` to send its body.
    pub(super) async fn write_continue(&mut self) -> pingora::Result<()> {
        if self.req.version == http::Version::HTTP_11 {
            self.stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .map_err(|e| Error::because(ErrorType::WriteError, "writing 100 Continue", e))?;
        }
        Ok(())
    }

    /// Queues the answer's head; it leaves with what follows it, or at the next flush.
    pub(super) fn write_response_header(&mut self, resp: &ResponseHeader) -> pingora::Result<()> {
        if self.resp != RespBody::NotStarted {
            return Err(Error::explain(
                ErrorType::InternalError,
                "response head written twice",
            ));
        }
        let code = resp.status.as_u16();
        let length = resp
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| parse_length(v.as_bytes()).ok());
        let http11 = self.req.version == http::Version::HTTP_11;
        if self.body != ReqBody::Done {
            // Answered before its body was read (a refusal): the connection ends after it.
            self.keep_alive = false;
        }
        self.resp =
            if self.req.method == http::Method::HEAD || code < 200 || code == 204 || code == 304 {
                RespBody::Empty
            } else if let Some(n) = length {
                RespBody::Length(n)
            } else if http11 {
                RespBody::Chunked
            } else {
                self.keep_alive = false;
                RespBody::UntilClose
            };
        let fields: usize = resp
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum();
        let mut head = Vec::with_capacity(fields + 128);
        head.extend_from_slice(b"HTTP/1.1 ");
        head.extend_from_slice(resp.status.as_str().as_bytes());
        head.push(b' ');
        head.extend_from_slice(
            resp.status
                .canonical_reason()
                .unwrap_or("Unknown")
                .as_bytes(),
        );
        head.extend_from_slice(b"\r\n");
        for (name, value) in resp.headers.iter() {
            // Framing and connection fields are this side's to write.
            if name == http::header::TRANSFER_ENCODING
                || name == http::header::CONNECTION
                || name == http::header::DATE
                || name == "keep-alive"
                || (name == http::header::CONTENT_LENGTH && length.is_none())
            {
                continue;
            }
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        if self.resp == RespBody::Chunked {
            head.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        head.extend_from_slice(b"date: ");
        with_http_date(|date| head.extend_from_slice(date));
        head.extend_from_slice(b"\r\n");
        if !self.keep_alive {
            head.extend_from_slice(b"connection: close\r\n");
        } else if !http11 {
            head.extend_from_slice(b"connection: keep-alive\r\n");
        }
        head.extend_from_slice(b"\r\n");
        self.queue(Piece::Data(Bytes::from(head)));
        if self.resp == RespBody::Empty {
            self.resp_done = true;
        }
        Ok(())
    }

    fn queue(&mut self, piece: Piece) {
        self.out_len += piece.bytes().len();
        self.out.push(piece);
    }

    /// Queues a piece of the answer's body, and its end with `end`. What is queued leaves at
    /// the end, past 16 KiB, or at the next [`flush`](Self::flush).
    pub(super) async fn write_response_body(
        &mut self,
        data: Bytes,
        end: bool,
    ) -> pingora::Result<()> {
        if self.resp == RespBody::NotStarted {
            return Err(Error::explain(
                ErrorType::InternalError,
                "response body before its head",
            ));
        }
        if self.resp_done && !data.is_empty() {
            return Ok(());
        }
        if !data.is_empty() {
            match self.resp {
                RespBody::NotStarted | RespBody::Empty => {}
                RespBody::Length(rest) => {
                    let n = take_len(rest, data.len());
                    if n < data.len() {
                        // More than announced: cut, and the connection cannot be trusted.
                        self.keep_alive = false;
                    }
                    self.resp = RespBody::Length(rest - n as u64);
                    if n > 0 {
                        self.queue(Piece::Data(data.slice(..n)));
                    }
                }
                RespBody::Chunked => {
                    let mut frame = [0u8; 24];
                    let mut len = 0;
                    if self.open_chunk {
                        frame[..2].copy_from_slice(b"\r\n");
                        len = 2;
                    }
                    len += hex_size(data.len(), &mut frame[len..]);
                    frame[len..len + 2].copy_from_slice(b"\r\n");
                    len += 2;
                    self.queue(Piece::Frame(frame, len as u8));
                    self.queue(Piece::Data(data));
                    self.open_chunk = true;
                }
                RespBody::UntilClose => self.queue(Piece::Data(data)),
            }
        }
        if end && !self.resp_done {
            match self.resp {
                RespBody::Chunked => {
                    let mut frame = [0u8; 24];
                    let last: &[u8] = if self.open_chunk {
                        b"\r\n0\r\n\r\n"
                    } else {
                        b"0\r\n\r\n"
                    };
                    frame[..last.len()].copy_from_slice(last);
                    self.queue(Piece::Frame(frame, last.len() as u8));
                    self.open_chunk = false;
                }
                RespBody::Length(rest) if rest > 0 => {
                    // Shorter than announced: only closing tells the client.
                    self.keep_alive = false;
                }
                _ => {}
            }
            self.resp_done = true;
        }
        // A body whose announced length is all queued waits for its end, which comes right
        // after the upstream connection is given back: a client that has the whole answer sends
        // its next request at once.
        let all_queued = matches!(self.resp, RespBody::Length(0));
        if end || (!all_queued && (self.out_len >= WRITE_AHEAD || self.out.len() >= MAX_IOV)) {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes whatever is queued, in vectored writes.
    pub(super) async fn flush(&mut self) -> pingora::Result<()> {
        let mut first = 0usize;
        let mut skip = 0usize;
        while first < self.out.len() {
            // The slices are made on each poll, not kept across the wait: 32 of them would
            // add half a kilobyte to every future that awaits a write (an open stream's).
            let (out, stream) = (&self.out[first..], &mut self.stream);
            let write = std::future::poll_fn(|cx| {
                let mut slices = [IoSlice::new(&[]); MAX_IOV];
                let mut count = 0;
                for (i, piece) in out.iter().take(MAX_IOV).enumerate() {
                    let bytes = piece.bytes();
                    slices[i] = IoSlice::new(if i == 0 { &bytes[skip..] } else { bytes });
                    count = i + 1;
                }
                std::pin::Pin::new(&mut *stream).poll_write_vectored(cx, &slices[..count])
            });
            let written = tokio::time::timeout(self.read_timeout, write)
                .await
                .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
            let mut n = match written {
                Ok(0) => {
                    self.drop_queue();
                    return Err(Error::explain(
                        ErrorType::WriteError,
                        "client connection closed while writing",
                    ));
                }
                Ok(n) => n,
                Err(e) => {
                    self.drop_queue();
                    return Err(Error::because(
                        ErrorType::WriteError,
                        "writing to the client",
                        e,
                    ));
                }
            };
            while n > 0 && first < self.out.len() {
                let left = self.out[first].bytes().len() - skip;
                if n >= left {
                    n -= left;
                    first += 1;
                    skip = 0;
                } else {
                    skip += n;
                    n = 0;
                }
            }
        }
        self.drop_queue();
        self.stream
            .flush()
            .await
            .map_err(|e| Error::because(ErrorType::WriteError, "writing to the client", e))
    }

    fn drop_queue(&mut self) {
        self.out.clear();
        if self.out.capacity() > MAX_IOV {
            self.out = Vec::new();
        }
        self.out_len = 0;
    }

    /// Waits while the client is silent: `Err` once it closed the connection or it failed,
    /// `Ok` when it sent bytes (a pipelined request, kept for its turn).
    pub(super) async fn watch_client(&mut self) -> Result<(), ()> {
        let mut some = [0u8; 64];
        match self.stream.read(&mut some).await {
            Ok(0) | Err(_) => Err(()),
            Ok(n) => {
                self.buf.extend_from_slice(&some[..n]);
                Ok(())
            }
        }
    }

    /// Ends the request: writes what is queued, and tells whether the connection can serve
    /// the next one (the answer given whole, the request body read to its end, and neither
    /// side asked to close).
    pub(super) async fn finish(&mut self) -> bool {
        if self.flush().await.is_err() {
            return false;
        }
        if self.resp == RespBody::UntilClose {
            return false;
        }
        self.keep_alive && self.resp_done && self.body == ReqBody::Done
    }

    /// Answers a request the relay could not serve with a bare status, when nothing of an
    /// answer was written yet, and marks the connection for closing.
    pub(super) async fn respond_error(&mut self, code: u16) {
        self.keep_alive = false;
        if self.response_written() {
            return;
        }
        let Ok(mut resp) = ResponseHeader::build_no_case(code, Some(2)) else {
            return;
        };
        let _ = resp.insert_header(http::header::CONTENT_LENGTH, "0");
        let _ = resp.insert_header(http::header::CACHE_CONTROL, "private, no-store");
        if self.write_response_header(&resp).is_ok() {
            let _ = self.write_response_body(Bytes::new(), true).await;
        }
    }

    /// Closes the connection, after what is queued. With request bytes unread (a refusal
    /// before the body), closing at once would make the kernel reset the connection, which can
    /// destroy the answer before the client reads it (RFC 9112 §9.6): the relay's side is shut
    /// first, and what the client still sends is read and dropped for a while.
    pub(super) async fn shutdown(&mut self) {
        let _ = self.flush().await;
        let _ = tokio::time::timeout(self.read_timeout, self.stream.shutdown()).await;
        if self.body == ReqBody::Done {
            return;
        }
        let deadline = tokio::time::Instant::now() + LINGER;
        let mut scratch = vec![0u8; 16 * 1024];
        let mut drained = 0;
        while drained < LINGER_BYTES {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut scratch)).await {
                Ok(Ok(n)) if n > 0 => drained += n,
                _ => break,
            }
        }
    }
}

/// Writes `n` in lower-case hex into `out`; the number of digits.
fn hex_size(n: usize, out: &mut [u8]) -> usize {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let digits = ((usize::BITS - n.leading_zeros()).div_ceil(4)).max(1) as usize;
    for i in 0..digits {
        out[digits - 1 - i] = DIGITS[(n >> (4 * i)) & 0xf];
    }
    digits
}

/// Calls `f` with the current date as an HTTP date, made once per second per thread.
fn with_http_date(f: impl FnOnce(&[u8])) {
    thread_local! {
        static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|cell| {
        let mut date = cell.borrow_mut();
        if date.0 != secs {
            let text = httpdate::fmt_http_date(now);
            if text.len() == 29 {
                date.1.copy_from_slice(text.as_bytes());
                date.0 = secs;
            }
        }
        f(&date.1);
    });
}

/// A `Host` value as RFC 9110 §7.2 has it: `host [ ":" port ]`, no user info; empty is allowed
/// (a target without an authority).
fn valid_host(value: &[u8]) -> bool {
    if value.is_empty() {
        return true;
    }
    if value.contains(&b'@') {
        return false;
    }
    // The parser takes any port text and brackets anywhere; RFC 3986 has a port of digits
    // (here within u16, or empty) and brackets only around an IP literal.
    let host_end = match value.first() {
        Some(b'[') => memchr::memchr(b']', value).map_or(value.len(), |i| i + 1),
        _ if memchr::memchr2(b'[', b']', value).is_some() => return false,
        _ => memchr::memrchr(b':', value).unwrap_or(value.len()),
    };
    let port_ok = match value.get(host_end..) {
        Some([]) | Some([b':']) | None => true,
        Some([b':', port @ ..]) => {
            port.iter().all(u8::is_ascii_digit)
                && std::str::from_utf8(port).is_ok_and(|p| p.parse::<u16>().is_ok())
        }
        Some(_) => false,
    };
    port_ok && http::uri::Authority::try_from(value).is_ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing unwrap is a failing test
mod tests {
    use super::*;
    use tokio::io::DuplexStream;

    const TIMEOUT: Duration = Duration::from_secs(5);

    /// A connection whose client end is returned for the test to drive.
    fn conn() -> (Downstream, DuplexStream) {
        let (server, client) = tokio::io::duplex(1 << 20);
        (Downstream::new(Box::new(server), TIMEOUT), client)
    }

    /// Everything the client end receives until the server end is dropped.
    async fn received(mut client: DuplexStream) -> String {
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        String::from_utf8(out).unwrap()
    }

    /// Writes an answer's head with its status, and `content-length` when given.
    fn answer_head(server: &mut Downstream, code: u16, length: Option<usize>) {
        let mut resp = ResponseHeader::build_no_case(code, None).unwrap();
        if let Some(n) = length {
            resp.insert_header("content-length", n.to_string()).unwrap();
        }
        server.write_response_header(&resp).unwrap();
    }

    /// Serves `wire` as one or more requests, answering each with its body echoed back.
    async fn echo(wire: &[&[u8]]) -> (Vec<String>, String) {
        let (mut server, mut client) = conn();
        for piece in wire {
            client.write_all(piece).await.unwrap();
        }
        client.shutdown().await.unwrap();
        let mut bodies = Vec::new();
        while server.read_request().await.unwrap() {
            let body = server.read_body(1 << 20).await.unwrap().unwrap();
            bodies.push(String::from_utf8(body.to_vec()).unwrap());
            answer_head(&mut server, 200, Some(body.len()));
            server.write_response_body(body, true).await.unwrap();
            if !server.finish().await {
                break;
            }
        }
        drop(server);
        (bodies, received(client).await)
    }

    #[tokio::test]
    async fn pipelined_requests_with_length_and_chunked_bodies() {
        let wire: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
            POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nx-t: 1\r\n\r\n\
            GET /c HTTP/1.1\r\nHost: x\r\n\r\n";
        // However the bytes arrive.
        for cut in 0..wire.len() {
            let (bodies, out) = echo(&[&wire[..cut], &wire[cut..]]).await;
            assert_eq!(bodies, ["hello", "abcde", ""], "cut at {cut}");
            assert_eq!(out.matches("HTTP/1.1 200 OK\r\n").count(), 3);
            assert!(out.ends_with("\r\n\r\n"), "{out}");
            assert!(out.contains("\r\n\r\nhello"));
        }
    }

    #[tokio::test]
    async fn head_fields_target_and_version() {
        let (mut server, mut client) = conn();
        client
            .write_all(b"POST /v1/messages?beta=true HTTP/1.0\r\nX-Api-Key: k1\r\nAccept: a\r\nAccept: b\r\nConnection: keep-alive\r\n\r\n")
            .await
            .unwrap();
        assert!(server.read_request().await.unwrap());
        let req = server.req_header();
        assert_eq!(req.method, http::Method::POST);
        assert_eq!(req.uri.path(), "/v1/messages");
        assert_eq!(req.uri.query(), Some("beta=true"));
        assert_eq!(req.version, http::Version::HTTP_10);
        assert_eq!(req.headers["x-api-key"], "k1");
        let accept: Vec<_> = req.headers.get_all("accept").iter().collect();
        assert_eq!(accept, ["a", "b"]);
        assert!(server.keep_alive(), "HTTP/1.0 with keep-alive");
        // The read buffer is freed once the head is taken.
        assert_eq!(server.buf.capacity(), 0);
    }

    #[tokio::test]
    async fn a_connection_waiting_for_its_next_request_holds_no_read_buffer() {
        let (mut server, mut client) = conn();
        client
            .write_all(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
            .await
            .unwrap();
        assert!(server.read_request().await.unwrap());
        let body = server.read_body(64).await.unwrap().unwrap();
        assert_eq!(&body[..], b"hi");
        // The body came in the same read as the head: the connection keeps no share of it.
        assert!(body.is_unique());
        drop(body);
        answer_head(&mut server, 204, None);
        server
            .write_response_body(Bytes::new(), true)
            .await
            .unwrap();
        assert!(server.finish().await);
        // Idle: the wait for the next head is pending, and leaves nothing allocated behind.
        {
            let next = server.read_request();
            tokio::pin!(next);
            assert!(futures::poll!(next.as_mut()).is_pending());
        }
        assert_eq!(server.buf.capacity(), 0);
        // The next request is read whole however its bytes come: the head in two pieces, the
        // second finding a started (non-empty) buffer.
        client
            .write_all(b"POST /b HTTP/1.1\r\nHost: x\r\nConte")
            .await
            .unwrap();
        client.write_all(b"nt-Length: 3\r\n\r\nabc").await.unwrap();
        assert!(server.read_request().await.unwrap());
        assert_eq!(server.req_header().uri.path(), "/b");
        assert_eq!(&server.read_body(64).await.unwrap().unwrap()[..], b"abc");
    }

    #[tokio::test]
    async fn unreadable_heads_are_refused() {
        let cases: &[(&[u8], &str)] = &[
            (b"GARBAGE\r\n\r\n", "bad"),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                "bad",
            ),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n",
                "bad",
            ),
            (b"POST / HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n", "bad"),
            // RFC 9112 §3.2: HTTP/1.1 without Host, Host twice, a Host that is no authority.
            (b"GET / HTTP/1.1\r\n\r\n", "exactly one Host"),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
                "exactly one Host",
            ),
            (
                b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
                "exactly one Host",
            ),
            (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", "invalid Host"),
            (b"GET / HTTP/1.1\r\nHost: user@a\r\n\r\n", "invalid Host"),
            (b"GET / HTTP/1.1\r\nHost: a:port\r\n\r\n", "invalid Host"),
            (b"GET / HTTP/1.1\r\nHost: [::1]x\r\n\r\n", "invalid Host"),
            (b"GET / HTTP/1.1\r\nHost: a[::1]:80\r\n\r\n", "invalid Host"),
            (b"GET / HTTP/1.1\r\nHost: a:99999\r\n\r\n", "invalid Host"),
            (b"GET / HTTP/1.1\r\nHost: a:+80\r\n\r\n", "invalid Host"),
        ];
        for (wire, why) in cases {
            let (mut server, mut client) = conn();
            client.write_all(wire).await.unwrap();
            let Err(err) = server.read_request().await else {
                panic!("{:?} was read", String::from_utf8_lossy(wire));
            };
            assert!(matches!(err, HeadError::Bad(_)), "{err} for {wire:?}");
            if *why != "bad" {
                assert!(err.to_string().contains(why), "{err} for {wire:?}");
            }
        }
        // Hosts as clients send them, and HTTP/1.0 without one, are read.
        for wire in [
            &b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nhost: 127.0.0.1:8080\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a:\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: API.Example.COM.:65535\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: [fe80::1%25eth0]:80\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost:\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
        ] {
            let (mut server, mut client) = conn();
            client.write_all(wire).await.unwrap();
            assert!(server.read_request().await.unwrap(), "{wire:?}");
        }
        // Only chunked, once and last, over all the lines: anything else is not read (501).
        for wire in [
            &b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\nContent-Length: 2\r\n\r\n",
        ] {
            let (mut server, mut client) = conn();
            client.write_all(wire).await.unwrap();
            let err = server.read_request().await.unwrap_err();
            assert!(matches!(err, HeadError::Unsupported), "{err} for {wire:?}");
        }
        let (mut server, mut client) = conn();
        let mut long = b"GET / HTTP/1.1\r\nHost: x\r\nx: ".to_vec();
        long.resize(MAX_HEAD + 10, b'a');
        client.write_all(&long).await.unwrap();
        assert!(matches!(
            server.read_request().await.unwrap_err(),
            HeadError::TooLarge
        ));
        let (mut server, mut client) = conn();
        let mut many = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        client.write_all(&many).await.unwrap();
        assert!(matches!(
            server.read_request().await.unwrap_err(),
            HeadError::TooLarge
        ));
    }

    #[tokio::test]
    async fn a_close_between_requests_is_not_an_error_but_mid_head_it_is() {
        let (mut server, mut client) = conn();
        client.shutdown().await.unwrap();
        assert!(!server.read_request().await.unwrap());
        let (mut server, mut client) = conn();
        client.write_all(b"GET / HT").await.unwrap();
        client.shutdown().await.unwrap();
        assert!(matches!(
            server.read_request().await.unwrap_err(),
            HeadError::Gone(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_must_be_whole_within_the_read_timeout_of_its_first_byte() {
        let (mut server, mut client) = conn();
        let trickle = tokio::spawn(async move {
            // A byte a second: each read is within the timeout, the head is not.
            for b in b"GET / HTTP/1.1\r\nHost: x\r\nx-slow: 1\r\n" {
                client.write_all(&[*b]).await.unwrap();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            client
        });
        let err = server.read_request().await.unwrap_err();
        assert!(matches!(err, HeadError::Gone(_)), "{err}");
        drop(trickle.await.unwrap());
    }

    #[tokio::test]
    async fn a_refusal_before_the_body_closes_without_resetting_the_client() {
        // Real sockets: closing with unread bytes would make the kernel send a reset, which
        // can destroy the answer before the client reads it.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let mut server = Downstream::new(
            Box::new(pingora::protocols::l4::stream::Stream::from(accepted)),
            TIMEOUT,
        );
        // More than the sockets' buffers take: the upload is still going when the answer is.
        let body = vec![b'x'; 16 << 20];
        client
            .write_all(
                format!(
                    "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let uploader = tokio::spawn(async move {
            client
                .write_all(&body)
                .await
                .expect("the upload is not reset");
            let mut out = Vec::new();
            client.read_to_end(&mut out).await.map(|_| out)
        });
        assert!(server.read_request().await.unwrap());
        answer_head(&mut server, 401, Some(6));
        server
            .write_response_body(Bytes::from_static(b"denied"), true)
            .await
            .unwrap();
        assert!(!server.finish().await, "the body is unread: not reused");
        server.shutdown().await;
        drop(server);
        let read = uploader.await.unwrap();
        let out = String::from_utf8(read.expect("no reset")).unwrap();
        assert!(out.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{out}");
        assert!(out.contains("connection: close\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\ndenied"), "{out}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_ends_after_the_read_timeout() {
        let (mut server, _client) = conn();
        assert!(!server.read_request().await.unwrap());
    }

    #[tokio::test]
    async fn faulty_framings_are_read_as_chunked_then_the_connection_closed() {
        // A length beside chunked, and chunked over HTTP/1.0 (RFC 9112 §6.1).
        for wire in [
            &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"POST / HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\nGET / HTTP/1.0\r\n\r\n",
        ] {
            let (bodies, out) = echo(&[wire]).await;
            assert_eq!(bodies, ["ab"]);
            assert!(out.contains("connection: close\r\n"), "{out}");
        }
    }

    #[tokio::test]
    async fn a_body_past_the_limit_is_left_unread() {
        for wire in [
            &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world"[..],
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        ] {
            let (mut server, mut client) = conn();
            client.write_all(wire).await.unwrap();
            assert!(server.read_request().await.unwrap());
            assert!(server.read_body(10).await.unwrap().is_none());
            assert!(!server.keep_alive());
        }
    }

    #[tokio::test]
    async fn broken_and_cut_chunked_bodies_are_errors() {
        for wire in [
            &b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab",
        ] {
            let (mut server, mut client) = conn();
            client.write_all(wire).await.unwrap();
            client.shutdown().await.unwrap();
            assert!(server.read_request().await.unwrap());
            let err = server.read_body(100).await.unwrap_err();
            assert_eq!(err.esource(), &pingora::ErrorSource::Downstream);
            assert!(!server.keep_alive());
        }
    }

    #[tokio::test]
    async fn a_streamed_answer_is_chunked_and_leaves_when_flushed() {
        let (mut server, mut client) = conn();
        client
            .write_all(b"POST / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(server.read_request().await.unwrap());
        let mut resp = ResponseHeader::build_no_case(200, None).unwrap();
        resp.insert_header("content-type", "text/event-stream")
            .unwrap();
        server.write_response_header(&resp).unwrap();
        server
            .write_response_body(Bytes::from_static(b"data: 1\n\n"), false)
            .await
            .unwrap();
        // Queued, not written, until the flush.
        let mut probe = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(50), client.read(&mut probe))
                .await
                .is_err()
        );
        server.flush().await.unwrap();
        server
            .write_response_body(Bytes::from(vec![b'x'; 300]), false)
            .await
            .unwrap();
        server
            .write_response_body(Bytes::new(), true)
            .await
            .unwrap();
        assert!(server.finish().await);
        drop(server);
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        let out = String::from_utf8(out).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("\r\ntransfer-encoding: chunked"), "{head}");
        assert!(head.contains("\r\ndate: "), "{head}");
        assert_eq!(
            body,
            format!(
                "9\r\ndata: 1\n\n\r\n12c\r\n{}\r\n0\r\n\r\n",
                "x".repeat(300)
            )
        );
    }

    #[tokio::test]
    async fn http_1_0_answers_without_length_end_with_the_connection() {
        let (mut server, mut client) = conn();
        client.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        assert!(server.read_request().await.unwrap());
        assert!(!server.keep_alive());
        answer_head(&mut server, 200, None);
        server
            .write_response_body(Bytes::from_static(b"abc"), true)
            .await
            .unwrap();
        assert!(!server.finish().await);
        drop(server);
        let out = received(client).await;
        assert!(out.contains("connection: close\r\n"), "{out}");
        assert!(!out.contains("chunked"), "{out}");
        assert!(out.ends_with("\r\n\r\nabc"), "{out}");
    }

    #[tokio::test]
    async fn head_requests_and_no_content_answers_have_no_body() {
        let (mut server, mut client) = conn();
        client
            .write_all(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        for code in [200, 204] {
            assert!(server.read_request().await.unwrap());
            answer_head(&mut server, code, Some(3));
            server
                .write_response_body(Bytes::from_static(b"abc"), true)
                .await
                .unwrap();
            assert!(server.finish().await);
        }
        drop(server);
        let out = received(client).await;
        assert!(!out.contains("abc"), "{out}");
        assert_eq!(out.matches("HTTP/1.1 ").count(), 2);
    }

    #[tokio::test]
    async fn a_body_past_its_length_is_cut_and_the_connection_closed() {
        let (mut server, mut client) = conn();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(server.read_request().await.unwrap());
        answer_head(&mut server, 200, Some(2));
        server
            .write_response_body(Bytes::from_static(b"abc"), true)
            .await
            .unwrap();
        assert!(!server.finish().await);
        drop(server);
        assert!(received(client).await.ends_with("\r\n\r\nab"));
    }

    #[tokio::test]
    async fn a_large_answer_leaves_in_pieces_and_whole() {
        // A small pipe: writes go out in several partial vectored writes.
        let (server_end, mut client) = tokio::io::duplex(1000);
        let mut server = Downstream::new(Box::new(server_end), TIMEOUT);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(server.read_request().await.unwrap());
        let reader = tokio::spawn(async move {
            let mut out = Vec::new();
            client.read_to_end(&mut out).await.unwrap();
            out
        });
        answer_head(&mut server, 200, None);
        let mut expected = Vec::new();
        for i in 0..100u8 {
            let piece = vec![b'a' + i % 26; 100 + usize::from(i) * 7];
            expected.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            expected.extend_from_slice(&piece);
            expected.extend_from_slice(b"\r\n");
            server
                .write_response_body(Bytes::from(piece), false)
                .await
                .unwrap();
        }
        expected.extend_from_slice(b"0\r\n\r\n");
        server
            .write_response_body(Bytes::new(), true)
            .await
            .unwrap();
        assert!(server.finish().await);
        drop(server);
        let out = reader.await.unwrap();
        let at = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert_eq!(out[at..], expected[..]);
    }

    #[tokio::test]
    async fn bytes_sent_during_an_answer_are_kept_for_the_next_request() {
        let (mut server, mut client) = conn();
        client
            .write_all(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(server.read_request().await.unwrap());
        client
            .write_all(b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        // The watch sees bytes, keeps them, and the next request is read from them.
        while server.buf.len() < 19 {
            server.watch_client().await.unwrap();
        }
        answer_head(&mut server, 200, Some(0));
        server
            .write_response_body(Bytes::new(), true)
            .await
            .unwrap();
        assert!(server.finish().await);
        assert!(server.read_request().await.unwrap());
        assert_eq!(server.req_header().uri.path(), "/2");
        drop(client);
        assert!(server.watch_client().await.is_err());
    }

    #[test]
    fn hex_sizes() {
        let mut out = [0u8; 24];
        for (n, hex) in [
            (0, "0"),
            (9, "9"),
            (300, "12c"),
            (0xffff, "ffff"),
            (1 << 20, "100000"),
        ] {
            let len = hex_size(n, &mut out);
            assert_eq!(&out[..len], hex.as_bytes());
        }
    }
}
