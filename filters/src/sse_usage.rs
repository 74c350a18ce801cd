//! Usage metering of upstream responses: an incremental Server-Sent-Events parser and one meter
//! per protocol and mode that reads token counts as the body streams past (DESIGN §9).
//!
//! Everything here runs synchronously in the response body filter, once per upstream chunk, so
//! it never re-buffers the stream: the SSE parser keeps only the incomplete last line and the
//! current event's data, lends complete events straight out of the chunk when it can, and the
//! meters parse JSON only for the few events that can carry usage.

use std::sync::LazyLock;

use memchr::memmem::Finder;
use memchr::{memchr, memchr2};
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::cost::ServiceTier;
use crate::json_scan;
use crate::types::{Protocol, SubUsage, TokenUsage};

/// Default cap on what an [`SseParser`] carries between chunks (partial line + event data).
pub const DEFAULT_MAX_SSE_BUFFER: usize = 16 << 20;

/// Default cap on a non-streamed body a [`UsageMeter`] accumulates before it gives up.
pub const DEFAULT_MAX_JSON_BODY: usize = 64 << 20;

/// The last bytes of an event dropped for outgrowing the cap that are still handed over (as a
/// [`SseEvent::truncated`] event): the usage of a Responses `response.completed` or a Gemini
/// chunk sits at the end of its event, after the output that made it huge.
pub const DROPPED_TAIL: usize = 4 << 10;

/// Longest `event:` name accepted; no provider sends more than a few dozen bytes.
const MAX_EVENT_NAME: usize = 256;

/// Longest model, id or error type kept from an upstream, so a hostile one cannot make the
/// usage record arbitrarily large.
const MAX_KEPT_STRING: usize = 256;

/// Buffers that grew past this are shrunk back after use, so one huge event does not pin
/// megabytes for the rest of a long stream.
const SHRINK_ABOVE: usize = 1 << 20;
const SHRINK_TO: usize = 64 << 10;

static USAGE_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\""));
static SERVICE_TIER_KEY: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"\"service_tier\""));
static ERROR_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"error\""));
static SERVER_TOOL_USE: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"\"server_tool_use\""));
static WEB_SEARCH: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"web_search\""));
static USAGE_METADATA_KEY: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"\"usageMetadata\""));
/// The end of Gemini's `"finishReason"` and `"blockReason"` keys.
static REASON_KEY_END: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"Reason\""));
/// The Google Search queries a grounded Gemini answer ran (in a candidate's groundingMetadata).
static WEB_SEARCH_QUERIES_KEY: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"\"webSearchQueries\""));

// ---------------------------------------------------------------------------------------------
// SSE parser
// ---------------------------------------------------------------------------------------------

/// One complete Server-Sent Event, borrowed from the chunk or from the parser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// The `event:` field, `""` when the event had none (or it was not UTF-8).
    pub event: &'a str,
    /// The event's `data:` lines joined with `\n` (no trailing newline).
    pub data: &'a [u8],
    /// The event outgrew the parser's cap and was dropped: `data` is only its last bytes (at
    /// most [`DROPPED_TAIL`]), starting anywhere, even inside a field name.
    pub truncated: bool,
}

/// Incremental Server-Sent-Events parser (WHATWG HTML, "Interpreting an event stream").
///
/// Lines end with `\n`, `\r\n` or `\r`; a blank line dispatches the event; `data:` lines are
/// joined with `\n`; lines starting with `:` are comments; one space after the colon is
/// stripped; `id:` and `retry:` are ignored (the relay never reconnects). Any split of the
/// byte stream yields the same events.
#[derive(Debug)]
pub struct SseParser {
    /// Incomplete last line of the previous chunk(s).
    tail: Vec<u8>,
    /// `event:` name of the event being built.
    name: Vec<u8>,
    /// Data of the event being built, when it could not be lent from a chunk.
    data: Vec<u8>,
    /// The event being built has at least one `data:` line (in `data` or lent from the chunk).
    has_data: bool,
    /// The previous chunk ended with `\r`: a `\n` starting the next chunk belongs to it.
    skip_lf: bool,
    /// Drop bytes until the end of the current line (it overflowed the cap).
    discard_line: bool,
    /// Drop lines until the blank line that ends the current event (it overflowed the cap).
    discard_event: bool,
    /// Some event was dropped because it overflowed the cap.
    overflowed: bool,
    /// No line has been seen yet (a leading UTF-8 BOM is skipped).
    at_stream_start: bool,
    /// Cap on `tail.len() + data.len()`.
    max_buffer: usize,
    /// The last bytes (at most [`DROPPED_TAIL`]) of the event being dropped.
    dropped_tail: Vec<u8>,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::new()
    }
}

impl SseParser {
    /// A parser that carries at most [`DEFAULT_MAX_SSE_BUFFER`] bytes between chunks.
    pub fn new() -> Self {
        Self::with_max_buffer(DEFAULT_MAX_SSE_BUFFER)
    }

    /// A parser that carries at most `max_buffer` bytes (partial line + event data), and
    /// [`DROPPED_TAIL`] bytes of an event it drops for outgrowing that.
    pub fn with_max_buffer(max_buffer: usize) -> Self {
        SseParser {
            tail: Vec::new(),
            name: Vec::new(),
            data: Vec::new(),
            has_data: false,
            skip_lf: false,
            discard_line: false,
            discard_event: false,
            overflowed: false,
            at_stream_start: true,
            max_buffer,
            dropped_tail: Vec::new(),
        }
    }

    /// Whether some event was dropped because it outgrew the buffer cap.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Parses the next chunk of the stream, calling `on_event` for every event it completes.
    pub fn feed(&mut self, chunk: &[u8], mut on_event: impl FnMut(SseEvent<'_>)) {
        let mut pos = 0;
        if self.skip_lf && !chunk.is_empty() {
            self.skip_lf = false;
            if chunk[0] == b'\n' {
                pos = 1;
            }
        }
        // Data of the current event that still sits in `chunk` (start, end): lent to
        // `on_event` without a copy if the event completes within this chunk.
        let mut lent: Option<(usize, usize)> = None;

        if !self.tail.is_empty() || self.discard_line {
            let Some(i) = memchr2(b'\r', b'\n', &chunk[pos..]) else {
                self.carry(&chunk[pos..]);
                return;
            };
            let end = pos + i;
            self.carry(&chunk[pos..end]);
            if self.discard_line {
                self.discard_line = false;
            } else {
                let tail = std::mem::take(&mut self.tail);
                self.line(&tail, None, chunk, &mut lent, &mut on_event);
                self.tail = tail;
                self.tail.clear();
                shrink(&mut self.tail);
            }
            pos = self.after_line_end(chunk, end);
        }

        while pos < chunk.len() {
            match memchr2(b'\r', b'\n', &chunk[pos..]) {
                Some(i) => {
                    let end = pos + i;
                    self.line(&chunk[pos..end], Some(pos), chunk, &mut lent, &mut on_event);
                    pos = self.after_line_end(chunk, end);
                }
                None => {
                    self.carry(&chunk[pos..]);
                    break;
                }
            }
        }

        // The event goes on in the next chunk: its lent data must outlive this one.
        if let Some((start, end)) = lent {
            let in_line = !self.tail.is_empty();
            self.append_data(&[slice(chunk, start, end)], in_line);
        }
    }

    /// Ends the stream: a last line without line end is taken as complete, and an event not
    /// followed by a blank line is dispatched.
    pub fn finish(&mut self, mut on_event: impl FnMut(SseEvent<'_>)) {
        self.skip_lf = false;
        let mut lent = None;
        if self.discard_line {
            self.discard_line = false;
            self.tail.clear();
        } else if !self.tail.is_empty() {
            let tail = std::mem::take(&mut self.tail);
            self.line(&tail, None, &[], &mut lent, &mut on_event);
            self.tail = tail;
            self.tail.clear();
            shrink(&mut self.tail);
        }
        self.dispatch(&[], &mut lent, &mut on_event);
    }

    /// Position after the line end that starts at `end` (`\n`, `\r\n` or `\r`).
    fn after_line_end(&mut self, chunk: &[u8], end: usize) -> usize {
        if chunk.get(end) == Some(&b'\r') {
            match chunk.get(end + 1) {
                Some(b'\n') => end + 2,
                Some(_) => end + 1,
                None => {
                    self.skip_lf = true;
                    end + 1
                }
            }
        } else {
            end + 1
        }
    }

    /// Keeps an incomplete line for the next chunk, within the cap.
    fn carry(&mut self, bytes: &[u8]) {
        if self.discard_line {
            self.keep_dropped(bytes);
            return;
        }
        if bytes.is_empty() {
            return;
        }
        if self.tail.len() + self.data.len() + bytes.len() > self.max_buffer {
            self.overflow(true);
            self.keep_dropped(bytes);
            return;
        }
        self.tail.extend_from_slice(bytes);
    }

    /// Appends to the owned event data, within the cap.
    fn append_data(&mut self, parts: &[&[u8]], in_line: bool) {
        let add: usize = parts.iter().map(|p| p.len()).sum();
        if self.tail.len() + self.data.len() + add > self.max_buffer {
            // In stream order: the data so far, these parts, then a line being carried.
            let tail = std::mem::take(&mut self.tail);
            self.overflow(in_line);
            for part in parts {
                self.keep_dropped(part);
            }
            self.keep_dropped_line(&tail);
            return;
        }
        for part in parts {
            self.data.extend_from_slice(part);
        }
    }

    /// Drops the current event (and the rest of the current line when `in_line`).
    fn overflow(&mut self, in_line: bool) {
        self.overflowed = true;
        self.discard_event = true;
        self.has_data = false;
        // What the event had so far, then what comes until its end, goes through the window
        // (emptied when the dropped event is handed over).
        let data = std::mem::take(&mut self.data);
        let tail = std::mem::take(&mut self.tail);
        self.keep_dropped(&data);
        self.keep_dropped_line(&tail);
        if in_line {
            self.discard_line = true;
        }
    }

    /// Keeps a line of the event being dropped, from its start (when it is no data line, or
    /// its field name is cut, it is kept as it is: only the window's end needs to be right).
    fn keep_dropped_line(&mut self, line: &[u8]) {
        if line.is_empty() {
            return;
        }
        let value = match line.strip_prefix(b"data:") {
            Some(value) => value.strip_prefix(b" ").unwrap_or(value),
            None => line,
        };
        if !self.dropped_tail.is_empty() {
            self.keep_dropped(b"\n");
        }
        self.keep_dropped(value);
    }

    /// Keeps the last [`DROPPED_TAIL`] bytes of the event being dropped.
    fn keep_dropped(&mut self, bytes: &[u8]) {
        if bytes.len() >= DROPPED_TAIL {
            self.dropped_tail.clear();
            self.dropped_tail
                .extend_from_slice(&bytes[bytes.len() - DROPPED_TAIL..]);
            return;
        }
        let excess = (self.dropped_tail.len() + bytes.len()).saturating_sub(DROPPED_TAIL);
        self.dropped_tail.drain(..excess);
        self.dropped_tail.extend_from_slice(bytes);
    }

    /// Interprets one complete line; `at` is its offset in `chunk` when it lies there.
    fn line(
        &mut self,
        line: &[u8],
        at: Option<usize>,
        chunk: &[u8],
        lent: &mut Option<(usize, usize)>,
        on_event: &mut impl FnMut(SseEvent<'_>),
    ) {
        let (line, at) = if self.at_stream_start {
            self.at_stream_start = false;
            match line.strip_prefix(b"\xEF\xBB\xBF") {
                Some(rest) => (rest, at.map(|a| a + 3)),
                None => (line, at),
            }
        } else {
            (line, at)
        };
        if line.is_empty() {
            self.dispatch(chunk, lent, on_event);
            return;
        }
        if self.discard_event {
            // A data line of the event being dropped: its value goes through the window.
            if line.starts_with(b"data:") {
                self.keep_dropped_line(line);
            }
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value_start) = match memchr(b':', line) {
            Some(colon) if line.get(colon + 1) == Some(&b' ') => (&line[..colon], colon + 2),
            Some(colon) => (&line[..colon], colon + 1),
            None => (line, line.len()),
        };
        let value = &line[value_start..];
        match field {
            b"data" => self.data_line(value, at.map(|a| a + value_start), chunk, lent),
            b"event" if value.len() > MAX_EVENT_NAME => self.overflow(false),
            b"event" => {
                self.name.clear();
                self.name.extend_from_slice(value);
            }
            _ => {}
        }
    }

    /// Adds one `data:` value; `value_at` is its offset in `chunk` when it lies there.
    fn data_line(
        &mut self,
        value: &[u8],
        value_at: Option<usize>,
        chunk: &[u8],
        lent: &mut Option<(usize, usize)>,
    ) {
        if !self.has_data {
            self.has_data = true;
            match value_at {
                Some(start) => *lent = Some((start, start + value.len())),
                None => self.append_data(&[value], false),
            }
        } else if let Some((start, end)) = lent.take() {
            self.append_data(&[slice(chunk, start, end), b"\n", value], false);
        } else {
            self.append_data(&[b"\n", value], false);
        }
    }

    /// Blank line: hands the event over (if it has data) and starts the next one.
    fn dispatch(
        &mut self,
        chunk: &[u8],
        lent: &mut Option<(usize, usize)>,
        on_event: &mut impl FnMut(SseEvent<'_>),
    ) {
        let lent = lent.take();
        if self.discard_event {
            self.discard_event = false;
            if !self.dropped_tail.is_empty() {
                let event = std::str::from_utf8(&self.name).unwrap_or("");
                on_event(SseEvent {
                    event,
                    data: &self.dropped_tail,
                    truncated: true,
                });
                self.dropped_tail.clear();
            }
        } else if self.has_data {
            let data = match lent {
                Some((start, end)) => slice(chunk, start, end),
                None => &self.data[..],
            };
            let event = std::str::from_utf8(&self.name).unwrap_or("");
            on_event(SseEvent {
                event,
                data,
                truncated: false,
            });
        }
        self.name.clear();
        self.data.clear();
        shrink(&mut self.data);
        self.has_data = false;
    }
}

/// `bytes[start..end]`, or nothing if out of range (never, by construction; no panic anyway).
fn slice(bytes: &[u8], start: usize, end: usize) -> &[u8] {
    bytes.get(start..end).unwrap_or(&[])
}

fn shrink(buf: &mut Vec<u8>) {
    if buf.capacity() > SHRINK_ABOVE {
        buf.shrink_to(SHRINK_TO);
    }
}

// ---------------------------------------------------------------------------------------------
// Meters
// ---------------------------------------------------------------------------------------------

/// What a meter learnt from one upstream response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeterResult {
    /// Token counts, normalised across protocols.
    pub usage: TokenUsage,
    /// Model the upstream reported (Anthropic `message.model`, OpenAI `model`, Gemini `modelVersion`).
    pub model: Option<String>,
    /// Upstream response id (Anthropic message id, OpenAI chat/response id, Gemini `responseId`).
    pub response_id: Option<String>,
    /// The upstream's terminal event (or the whole JSON body) was seen.
    pub complete: bool,
    /// Type of an upstream `error` event or error JSON, if any.
    pub upstream_error: Option<String>,
    /// The service tier the upstream says it served the request at (OpenAI `service_tier`).
    pub service_tier: Option<ServiceTier>,
    /// Tokens spent on other models (an Anthropic advisor's passes), billed at their prices.
    pub sub_usage: Vec<SubUsage>,
}

/// Reads token usage from an upstream response body as it streams past.
#[derive(Debug)]
pub enum UsageMeter {
    /// Anthropic Messages, `stream: true`.
    AnthropicStream(StreamMeter),
    /// Anthropic Messages, one JSON body.
    AnthropicJson(JsonMeter),
    /// OpenAI Chat Completions, `stream: true`.
    OpenaiChatStream(StreamMeter),
    /// OpenAI Chat Completions, one JSON body.
    OpenaiChatJson(JsonMeter),
    /// OpenAI Responses, `stream: true`.
    OpenaiResponsesStream(StreamMeter),
    /// OpenAI Responses, one JSON body.
    OpenaiResponsesJson(JsonMeter),
    /// Gemini `streamGenerateContent?alt=sse`.
    GeminiStream(StreamMeter),
    /// Gemini `generateContent` (one JSON object); becomes [`UsageMeter::GeminiArray`] when the
    /// body opens an array.
    GeminiJson(JsonMeter),
    /// Gemini `streamGenerateContent` without `alt=sse` (a JSON array of chunks).
    GeminiArray(GeminiArrayMeter),
}

/// Meter state of an SSE response: the parser and what the events said so far.
#[derive(Debug)]
pub struct StreamMeter {
    parser: SseParser,
    state: StreamState,
}

/// Meter state of a JSON response: the body so far, parsed at the end.
#[derive(Debug)]
pub struct JsonMeter {
    body: Vec<u8>,
    max_body: usize,
    gave_up: bool,
    result: Option<MeterResult>,
}

/// Meter state of a Gemini `streamGenerateContent` answer without `alt=sse`: a JSON array of
/// GenerateContentResponse objects (the SDKs' non-SSE stream form), read element by element as
/// it arrives, so a stream cut midway books the cumulative `usageMetadata` seen so far, as with
/// `alt=sse`. Only the bytes of an element not yet complete are kept.
#[derive(Debug)]
pub struct GeminiArrayMeter {
    at: ArrayAt,
    /// The element being read, when it began in an earlier chunk.
    pending: Vec<u8>,
    /// Where the element being read ends.
    scan: json_scan::ValueEnd,
    /// The element being read outgrew the cap: its bytes are dropped until it ends.
    skipping: bool,
    max_element: usize,
    gave_up: bool,
    result: MeterResult,
    counts: GeminiCounts,
    /// Chunks of the answer seen (each a piece of generated output).
    chunks: u64,
}

/// Where a [`GeminiArrayMeter`] stands in the array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArrayAt {
    /// Before `[` (blank space only so far).
    Open,
    /// After `[`: an element or `]`.
    First,
    /// After `,`: an element.
    Next,
    /// Inside an element.
    Element,
    /// After an element: `,` or `]`.
    After,
    /// After `]`.
    Closed,
    /// Not an array of objects: nothing more is read.
    Broken,
}

#[derive(Debug, Default)]
struct StreamState {
    result: MeterResult,
    anthropic: AnthropicCounts,
    /// Anthropic: the web searches whose blocks started, a lower bound of the count
    /// `message_delta` reports, for a stream cut before it.
    searches_started: u64,
    gemini: GeminiCounts,
    /// OpenAI Chat: the first chunk (which names the id and model) was parsed.
    seen_first_chunk: bool,
    /// OpenAI Chat: a chunk carried usage.
    seen_usage: bool,
    /// Delta events of answer text seen (Anthropic, OpenAI): each carries a token or more,
    /// so their count is a lower bound of the output should the usage never come.
    text_deltas: u64,
}

impl UsageMeter {
    /// A meter for a response of `protocol`, streamed (SSE) or not (JSON).
    pub fn new(protocol: Protocol, stream: bool) -> Self {
        let max = if stream {
            DEFAULT_MAX_SSE_BUFFER
        } else {
            DEFAULT_MAX_JSON_BODY
        };
        Self::with_limit(protocol, stream, max)
    }

    /// Like [`UsageMeter::new`], with `limit` bytes as the SSE carry cap or the JSON body cap.
    pub fn with_limit(protocol: Protocol, stream: bool, limit: usize) -> Self {
        let sse = || StreamMeter {
            parser: SseParser::with_max_buffer(limit),
            state: StreamState::default(),
        };
        let json = || JsonMeter {
            body: Vec::new(),
            max_body: limit,
            gave_up: false,
            result: None,
        };
        match (protocol, stream) {
            (Protocol::Anthropic, true) => UsageMeter::AnthropicStream(sse()),
            (Protocol::Anthropic, false) => UsageMeter::AnthropicJson(json()),
            (Protocol::OpenaiChat, true) => UsageMeter::OpenaiChatStream(sse()),
            (Protocol::OpenaiChat, false) => UsageMeter::OpenaiChatJson(json()),
            (Protocol::OpenaiResponses, true) => UsageMeter::OpenaiResponsesStream(sse()),
            (Protocol::OpenaiResponses, false) => UsageMeter::OpenaiResponsesJson(json()),
            (Protocol::Gemini, true) => UsageMeter::GeminiStream(sse()),
            (Protocol::Gemini, false) => UsageMeter::GeminiJson(json()),
        }
    }

    /// Reads the next upstream body chunk.
    pub fn feed(&mut self, chunk: &[u8]) {
        match self {
            UsageMeter::AnthropicStream(m) => {
                let state = &mut m.state;
                m.parser.feed(chunk, |ev| anthropic_event(state, ev));
            }
            UsageMeter::OpenaiChatStream(m) => {
                let state = &mut m.state;
                m.parser.feed(chunk, |ev| chat_event(state, ev));
            }
            UsageMeter::OpenaiResponsesStream(m) => {
                let state = &mut m.state;
                m.parser.feed(chunk, |ev| responses_event(state, ev));
            }
            UsageMeter::GeminiStream(m) => {
                let state = &mut m.state;
                m.parser.feed(chunk, |ev| gemini_event(state, ev));
            }
            UsageMeter::GeminiJson(m) if m.undecided() && opens_array(&m.body, chunk) => {
                let mut array = GeminiArrayMeter::new(m.max_body);
                array.feed(chunk);
                *self = UsageMeter::GeminiArray(array);
            }
            UsageMeter::AnthropicJson(m)
            | UsageMeter::OpenaiChatJson(m)
            | UsageMeter::OpenaiResponsesJson(m)
            | UsageMeter::GeminiJson(m) => {
                if m.undecided() && starts_event_stream(&m.body, chunk) {
                    self.become_stream(chunk);
                } else {
                    m.feed(chunk);
                }
            }
            UsageMeter::GeminiArray(m) => m.feed(chunk),
        }
    }

    /// A JSON meter whose body turned out to be an event stream (an upstream that streams
    /// under another content type): the same protocol's stream meter takes over, fed what was
    /// held (blank space) and `chunk`.
    fn become_stream(&mut self, chunk: &[u8]) {
        let (protocol, held, limit) = match self {
            UsageMeter::AnthropicJson(m) => (Protocol::Anthropic, &mut m.body, m.max_body),
            UsageMeter::OpenaiChatJson(m) => (Protocol::OpenaiChat, &mut m.body, m.max_body),
            UsageMeter::OpenaiResponsesJson(m) => {
                (Protocol::OpenaiResponses, &mut m.body, m.max_body)
            }
            UsageMeter::GeminiJson(m) => (Protocol::Gemini, &mut m.body, m.max_body),
            _ => return,
        };
        let held = std::mem::take(held);
        *self = UsageMeter::with_limit(protocol, true, limit.min(DEFAULT_MAX_SSE_BUFFER));
        self.feed(&held);
        self.feed(chunk);
    }

    /// Delta events of answer text seen in a stream (Anthropic, OpenAI Chat and Responses;
    /// for Gemini, the chunks of the answer, in SSE or as array elements; 0 for whole JSON
    /// answers): what an estimate of the output starts from when the stream ended before its
    /// usage.
    pub fn text_deltas(&self) -> u64 {
        match self {
            UsageMeter::AnthropicStream(m)
            | UsageMeter::OpenaiChatStream(m)
            | UsageMeter::OpenaiResponsesStream(m)
            | UsageMeter::GeminiStream(m) => m.state.text_deltas,
            UsageMeter::GeminiArray(m) => m.chunks,
            _ => 0,
        }
    }

    /// An OpenAI Chat stream whose chunks never carried usage: a compatible upstream that
    /// ignores `stream_options.include_usage` reports none, even at `[DONE]`.
    pub fn usage_never_reported(&self) -> bool {
        matches!(self, UsageMeter::OpenaiChatStream(m) if !m.state.seen_usage)
    }

    /// A Responses stream's response id, once its first event named it.
    pub fn streamed_response_id(&self) -> Option<&str> {
        match self {
            UsageMeter::OpenaiResponsesStream(m) => m.state.result.response_id.as_deref(),
            _ => None,
        }
    }

    /// Ends the body and returns everything learnt; calling it again returns the same.
    pub fn finish(&mut self) -> MeterResult {
        match self {
            UsageMeter::AnthropicStream(m) => {
                let state = &mut m.state;
                m.parser.finish(|ev| anthropic_event(state, ev));
                m.state.result.clone()
            }
            UsageMeter::OpenaiChatStream(m) => {
                let state = &mut m.state;
                m.parser.finish(|ev| chat_event(state, ev));
                m.state.result.clone()
            }
            UsageMeter::OpenaiResponsesStream(m) => {
                let state = &mut m.state;
                m.parser.finish(|ev| responses_event(state, ev));
                m.state.result.clone()
            }
            UsageMeter::GeminiStream(m) => {
                let state = &mut m.state;
                m.parser.finish(|ev| gemini_event(state, ev));
                m.state.result.clone()
            }
            UsageMeter::AnthropicJson(m) => m.finish(parse_anthropic_json),
            UsageMeter::OpenaiChatJson(m) => m.finish(parse_chat_json),
            UsageMeter::OpenaiResponsesJson(m) => m.finish(parse_responses_json),
            UsageMeter::GeminiJson(m) => m.finish(parse_gemini_json),
            UsageMeter::GeminiArray(m) => m.result(),
        }
    }

    /// What is known so far without ending the body (for streams the client cut).
    pub fn snapshot(&self) -> MeterResult {
        match self {
            UsageMeter::AnthropicStream(m)
            | UsageMeter::OpenaiChatStream(m)
            | UsageMeter::OpenaiResponsesStream(m)
            | UsageMeter::GeminiStream(m) => m.state.result.clone(),
            UsageMeter::AnthropicJson(m)
            | UsageMeter::OpenaiChatJson(m)
            | UsageMeter::OpenaiResponsesJson(m)
            | UsageMeter::GeminiJson(m) => m.result.clone().unwrap_or_default(),
            UsageMeter::GeminiArray(m) => m.result(),
        }
    }

    /// Whether metering hit its cap (an SSE event or the JSON body was too large) and dropped data.
    pub fn gave_up(&self) -> bool {
        match self {
            UsageMeter::AnthropicStream(m)
            | UsageMeter::OpenaiChatStream(m)
            | UsageMeter::OpenaiResponsesStream(m)
            | UsageMeter::GeminiStream(m) => m.parser.overflowed(),
            UsageMeter::AnthropicJson(m)
            | UsageMeter::OpenaiChatJson(m)
            | UsageMeter::OpenaiResponsesJson(m)
            | UsageMeter::GeminiJson(m) => m.gave_up,
            UsageMeter::GeminiArray(m) => m.gave_up,
        }
    }
}

/// Whether a body that starts with `held` (blank so far) and then `chunk` is an event stream
/// rather than JSON: its first byte that is not blank opens an SSE field or comment (`data:`,
/// `event:`, `id:`, `retry:`, `:`), where JSON would open an object or array. `false` while
/// only blank space has come.
fn starts_event_stream(held: &[u8], chunk: &[u8]) -> bool {
    let first = held.iter().chain(chunk).find(|b| !b.is_ascii_whitespace());
    matches!(first, Some(b'd' | b'e' | b'i' | b'r' | b':'))
}

/// Whether a body that starts with `held` (blank so far) and then `chunk` is a JSON array.
fn opens_array(held: &[u8], chunk: &[u8]) -> bool {
    let first = held.iter().chain(chunk).find(|b| !b.is_ascii_whitespace());
    first == Some(&b'[')
}

impl GeminiArrayMeter {
    /// A meter keeping at most `max_element` bytes of one element.
    fn new(max_element: usize) -> Self {
        GeminiArrayMeter {
            at: ArrayAt::Open,
            pending: Vec::new(),
            scan: json_scan::ValueEnd::default(),
            skipping: false,
            max_element,
            gave_up: false,
            result: MeterResult::default(),
            counts: GeminiCounts::default(),
            chunks: 0,
        }
    }

    fn feed(&mut self, chunk: &[u8]) {
        let mut i = 0;
        // Where the element being read began, when that is in this chunk (it is then lent
        // from the chunk, not copied).
        let mut began = None;
        while i < chunk.len() {
            if self.at != ArrayAt::Element {
                i = skip_blank(chunk, i);
                let Some(&b) = chunk.get(i) else { break };
                self.at = match (self.at, b) {
                    (ArrayAt::Open, b'[') => ArrayAt::First,
                    (ArrayAt::First | ArrayAt::Next, b'{') => {
                        self.scan = json_scan::ValueEnd::default();
                        began = Some(i);
                        // The scan reads the opening brace itself.
                        self.at = ArrayAt::Element;
                        continue;
                    }
                    (ArrayAt::First | ArrayAt::After, b']') => ArrayAt::Closed,
                    (ArrayAt::After, b',') => ArrayAt::Next,
                    // Blank space after the array is all there should be; anything else is
                    // not read.
                    (ArrayAt::Closed | ArrayAt::Broken, _) => return,
                    _ => ArrayAt::Broken,
                };
                i += 1;
                continue;
            }
            match self.scan.scan(chunk, i) {
                json_scan::Scanned::End(end) => {
                    match began {
                        Some(start) => self.element(slice(chunk, start, end)),
                        None => {
                            self.keep(slice(chunk, 0, end));
                            let pending = std::mem::take(&mut self.pending);
                            self.element(&pending);
                            self.pending = pending;
                        }
                    }
                    self.pending.clear();
                    shrink(&mut self.pending);
                    self.skipping = false;
                    began = None;
                    self.at = ArrayAt::After;
                    i = end;
                }
                json_scan::Scanned::More => {
                    self.keep(slice(chunk, began.unwrap_or(0), chunk.len()));
                    return;
                }
                json_scan::Scanned::Malformed => {
                    self.pending = Vec::new();
                    self.at = ArrayAt::Broken;
                    return;
                }
            }
        }
    }

    /// Keeps bytes of the element being read, within the cap.
    fn keep(&mut self, bytes: &[u8]) {
        if self.skipping {
            return;
        }
        if self.pending.len() + bytes.len() > self.max_element {
            self.skipping = true;
            self.gave_up = true;
            self.pending = Vec::new();
            return;
        }
        self.pending.extend_from_slice(bytes);
    }

    /// Applies one complete element (unless it was dropped for its size).
    fn element(&mut self, data: &[u8]) {
        if self.skipping {
            self.chunks = self.chunks.saturating_add(1);
            return;
        }
        if let Some(chunk) = read_gemini_chunk(data, &self.result) {
            if chunk.error.is_none() {
                self.chunks = self.chunks.saturating_add(1);
            }
            apply_gemini_chunk(&mut self.result, &mut self.counts, chunk);
        }
    }

    /// What the elements read so far said; a closed array is a whole answer.
    fn result(&self) -> MeterResult {
        let mut result = self.result.clone();
        if self.at == ArrayAt::Closed {
            result.complete = true;
        }
        result
    }
}

/// Index of the first byte at or after `i` that is not JSON whitespace.
fn skip_blank(buf: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\n' | b'\r' | b'\t') = buf.get(i) {
        i += 1;
    }
    i
}

impl JsonMeter {
    /// Nothing but blank space has come yet: the body's kind is still open.
    fn undecided(&self) -> bool {
        !self.gave_up && self.result.is_none() && self.body.iter().all(u8::is_ascii_whitespace)
    }

    fn feed(&mut self, chunk: &[u8]) {
        if self.gave_up || self.result.is_some() {
            return;
        }
        if self.body.len() + chunk.len() > self.max_body {
            self.gave_up = true;
            self.body = Vec::new();
            return;
        }
        self.body.extend_from_slice(chunk);
    }

    fn finish(&mut self, parse: fn(&[u8]) -> Option<MeterResult>) -> MeterResult {
        if let Some(result) = &self.result {
            return result.clone();
        }
        let result = if self.gave_up {
            MeterResult::default()
        } else {
            parse(&self.body).unwrap_or_default()
        };
        self.body = Vec::new();
        self.result = Some(result.clone());
        result
    }
}

/// Whether an OpenAI Chat stream chunk only carries usage (`choices` empty, `usage` not null):
/// the chunk the relay asked for with `stream_options.include_usage` and does not forward.
pub fn is_usage_only_chunk(data: &[u8]) -> bool {
    // Cheap reject first: with include_usage every chunk has `"usage":null`.
    if !has_non_null_usage(data) {
        return false;
    }
    #[derive(Deserialize)]
    struct Probe<'a> {
        #[serde(borrow)]
        choices: Option<&'a RawValue>,
        #[serde(borrow)]
        usage: Option<&'a RawValue>,
    }
    match serde_json::from_slice::<Probe<'_>>(data) {
        Ok(probe) => probe.usage.is_some() && is_empty_array(probe.choices),
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------------------------
// Wire shapes (only the fields the meters read; serde skips the rest)
// ---------------------------------------------------------------------------------------------

/// Anthropic `usage` (message_start.message.usage, message_delta.usage, JSON body).
#[derive(Deserialize, Default, Debug, PartialEq)]
struct AnthropicUsageWire {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation: Option<AnthropicCacheCreationWire>,
    server_tool_use: Option<AnthropicServerToolUseWire>,
    /// `fast` when the request ran in fast mode (billed at the model's fast card).
    speed: Option<String>,
    /// The sampling passes of a request that took more than one (server-side compaction, an
    /// advisor): the top-level counts are the answer's pass alone, the others are billed on
    /// top of them.
    iterations: Option<Vec<AnthropicIterationWire>>,
}

/// One entry of Anthropic `usage.iterations`.
#[derive(Deserialize, Default, Debug, PartialEq)]
struct AnthropicIterationWire {
    #[serde(rename = "type")]
    kind: Option<String>,
    /// The model of an advisor's pass.
    model: Option<String>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation: Option<AnthropicCacheCreationWire>,
}

impl AnthropicIterationWire {
    /// A pass the top-level counts leave out and the relay must bill: the summary a
    /// compaction wrote (on the request's model), or an advisor's sub-inference (on the
    /// advisor's; one that names no model is billed as unpriced, never as another). The
    /// answer's own pass (`message`) is the top-level counts.
    fn pass(&self) -> Option<SubUsage> {
        let model = match self.kind.as_deref()? {
            "compaction" => None,
            "advisor_message" => Some(self.model.clone().unwrap_or_default()),
            _ => return None,
        };
        let total = self.cache_creation_input_tokens.unwrap_or(0);
        let (w5, w1) = match &self.cache_creation {
            Some(split) => {
                let w1 = split.ephemeral_1h_input_tokens.unwrap_or(0).min(total);
                (total - w1, w1)
            }
            None => (total, 0),
        };
        Some(SubUsage {
            model,
            tokens: TokenUsage {
                input_tokens: self.input_tokens.unwrap_or(0),
                output_tokens: self.output_tokens.unwrap_or(0),
                cache_write_5m_tokens: w5,
                cache_write_1h_tokens: w1,
                cache_read_tokens: self.cache_read_input_tokens.unwrap_or(0),
                ..TokenUsage::default()
            },
        })
    }
}

#[derive(Deserialize, Default, Debug, PartialEq)]
struct AnthropicCacheCreationWire {
    ephemeral_5m_input_tokens: Option<u64>,
    ephemeral_1h_input_tokens: Option<u64>,
}

/// Anthropic `usage.server_tool_use`: tool calls Anthropic runs and bills apart from tokens.
#[derive(Deserialize, Default, Debug, PartialEq)]
struct AnthropicServerToolUseWire {
    web_search_requests: Option<u64>,
}

/// Anthropic message (message_start.message, or the JSON body itself).
#[derive(Deserialize)]
struct AnthropicMessageWire<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    usage: Option<AnthropicUsageWire>,
    error: Option<ErrorWire>,
}

#[derive(Deserialize)]
struct AnthropicMessageStartWire<'a> {
    #[serde(borrow)]
    message: AnthropicMessageWire<'a>,
}

#[derive(Deserialize)]
struct AnthropicMessageDeltaWire {
    usage: Option<AnthropicUsageWire>,
}

/// OpenAI Chat `usage`.
#[derive(Deserialize)]
struct ChatUsageWire {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    prompt_tokens_details: Option<CachedTokensWire>,
    completion_tokens_details: Option<ReasoningTokensWire>,
}

/// OpenAI `prompt_tokens_details` / `input_tokens_details`: of the input count, the part read
/// from the cache and (GPT-5.6 and later) the part written to it.
#[derive(Deserialize)]
struct CachedTokensWire {
    cached_tokens: Option<u64>,
    cache_write_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct ReasoningTokensWire {
    reasoning_tokens: Option<u64>,
}

/// OpenAI Chat stream chunk or JSON body.
#[derive(Deserialize)]
struct ChatWire<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    choices: Option<&'a RawValue>,
    usage: Option<ChatUsageWire>,
    error: Option<ErrorWire>,
    #[serde(borrow)]
    service_tier: Option<&'a RawValue>,
}

/// OpenAI Responses `usage`.
#[derive(Deserialize)]
struct ResponsesUsageWire {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    input_tokens_details: Option<CachedTokensWire>,
    output_tokens_details: Option<ReasoningTokensWire>,
}

/// OpenAI Responses response object (stream `response` field, or the JSON body).
#[derive(Deserialize)]
struct ResponseWire<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    usage: Option<ResponsesUsageWire>,
    /// `null` on success, `{code, message}` when the response failed.
    error: Option<ErrorWire>,
    /// The output items; only a JSON answer's are read (a stream's searches are counted from
    /// their own events).
    #[serde(borrow)]
    output: Option<&'a RawValue>,
    /// The tier it was served at (`default`, `priority`, `flex`); the created event names
    /// the one asked for (`auto`), the terminal one the one served.
    #[serde(borrow)]
    service_tier: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ResponseEventWire<'a> {
    #[serde(borrow)]
    response: Option<ResponseWire<'a>>,
}

/// Gemini `usageMetadata`.
#[derive(Deserialize, Default, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
struct GeminiUsageWire {
    prompt_token_count: Option<u64>,
    cached_content_token_count: Option<u64>,
    candidates_token_count: Option<u64>,
    thoughts_token_count: Option<u64>,
    tool_use_prompt_token_count: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GeminiCandidateWire<'a> {
    finish_reason: Option<IgnoredAny>,
    /// Read apart, leniently: grounding of another shape costs its searches, not the chunk's
    /// tokens.
    #[serde(borrow)]
    grounding_metadata: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GeminiGroundingWire<'a> {
    #[serde(borrow)]
    web_search_queries: Option<Vec<&'a RawValue>>,
}

/// Google Search queries a grounded answer ran, as Gemini bills them: each distinct query
/// once (however its text is escaped, in whichever chunks it is listed), empty ones not at
/// all; at most [`MAX_SEARCH_QUERIES`] (an answer runs a handful, and an upstream's list is
/// not trusted to be short). Kept as hashes of the queries' text, so a stream's list outlives
/// the chunk it came in.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct SearchQueries(Vec<u64>);

/// Most distinct search queries one Gemini answer is counted for.
const MAX_SEARCH_QUERIES: usize = 256;

impl SearchQueries {
    /// One element of a `webSearchQueries` array (a JSON string, as sent).
    fn add(&mut self, query: &[u8]) {
        if self.0.len() >= MAX_SEARCH_QUERIES || query == b"\"\"" || query == b"null" {
            return;
        }
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        if query.contains(&b'\\') {
            // Escaped (`\u0041`, `\"`): the text it stands for, as a plain one is hashed.
            match serde_json::from_slice::<String>(query) {
                Ok(text) if text.is_empty() => return,
                Ok(text) => text.as_bytes().hash(&mut hasher),
                Err(_) => query.hash(&mut hasher),
            }
        } else {
            query
                .strip_prefix(b"\"")
                .and_then(|q| q.strip_suffix(b"\""))
                .unwrap_or(query)
                .hash(&mut hasher);
        }
        self.insert(hasher.finish());
    }

    /// A query's hash, unless it is counted already or the list is full.
    fn insert(&mut self, key: u64) {
        if self.0.len() < MAX_SEARCH_QUERIES && !self.0.contains(&key) {
            self.0.push(key);
        }
    }

    /// Adds the queries of `other` (another chunk's).
    fn union(&mut self, other: &SearchQueries) {
        for &key in &other.0 {
            self.insert(key);
        }
    }

    /// The queries of a candidate's `groundingMetadata` value, read leniently: grounding of
    /// another shape (not an object, queries not an array) adds none, and never fails the
    /// chunk it came in.
    fn add_grounding(&mut self, grounding: &[u8]) {
        if let Ok(GeminiGroundingWire {
            web_search_queries: Some(list),
        }) = serde_json::from_slice(grounding)
        {
            for query in list {
                self.add(query.get().as_bytes());
            }
        }
    }

    fn count(&self) -> Option<u64> {
        (!self.0.is_empty()).then_some(self.0.len() as u64)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GeminiPromptFeedbackWire {
    block_reason: Option<IgnoredAny>,
}

/// One Gemini GenerateContentResponse (an SSE event, the JSON body, or an array element).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GeminiChunkWire<'a> {
    #[serde(borrow)]
    candidates: Option<Vec<GeminiCandidateWire<'a>>>,
    prompt_feedback: Option<GeminiPromptFeedbackWire>,
    usage_metadata: Option<GeminiUsageWire>,
    #[serde(borrow)]
    model_version: Option<&'a RawValue>,
    #[serde(borrow)]
    response_id: Option<&'a RawValue>,
    error: Option<ErrorWire>,
}

/// The error object of every provider: Anthropic/OpenAI `type`, OpenAI `code`, Gemini `status`.
#[derive(Deserialize, Debug, PartialEq)]
struct ErrorWire {
    #[serde(rename = "type")]
    kind: Option<String>,
    code: Option<serde_json::Value>,
    status: Option<String>,
}

/// A stream `error` event: `{"error": {...}}` or the error fields at the top level
/// (OpenAI Responses: `{"type":"error","code":...,"message":...}`).
#[derive(Deserialize)]
struct ErrorEventWire {
    error: Option<ErrorWire>,
    #[serde(flatten)]
    top: ErrorWire,
}

impl ErrorWire {
    /// The most specific stable name the error carries.
    fn kind(self) -> String {
        let kind = self.kind.filter(|k| k != "error");
        let code = match self.code {
            Some(serde_json::Value::String(s)) => Some(s),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        bounded(
            kind.or(self.status)
                .or(code)
                .unwrap_or_else(|| "error".to_owned()),
        )
    }
}

fn error_event_kind(data: &[u8]) -> String {
    match serde_json::from_slice::<ErrorEventWire>(data) {
        Ok(ErrorEventWire { error: Some(e), .. }) => e.kind(),
        Ok(ErrorEventWire { top, .. }) => top.kind(),
        Err(_) => "error".to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Per-protocol rules
// ---------------------------------------------------------------------------------------------

/// Anthropic counters, field by field: the highest reported (message_delta usage is cumulative
/// and may carry only some fields; some compatible servers send `"input_tokens":0` in it).
#[derive(Debug, Default)]
struct AnthropicCounts {
    input: Option<u64>,
    output: Option<u64>,
    cache_creation: Option<u64>,
    cache_read: Option<u64>,
    ephemeral_5m: Option<u64>,
    ephemeral_1h: Option<u64>,
    web_search: Option<u64>,
    /// The speed the usage named (`fast` mode, else standard), when it named one.
    speed: Option<ServiceTier>,
    /// The compaction and advisor passes, billed each on its own.
    passes: Vec<SubUsage>,
}

impl AnthropicCounts {
    fn merge(&mut self, u: AnthropicUsageWire) {
        if let Some(speed) = &u.speed {
            self.speed = Some(match speed.as_str() {
                "fast" => ServiceTier::Fast,
                _ => ServiceTier::Standard,
            });
        }
        if let Some(iterations) = &u.iterations {
            // Cumulative like the rest: a later list replaces an earlier one it does not fall
            // short of.
            let passes: Vec<SubUsage> = iterations.iter().filter_map(|p| p.pass()).collect();
            if passes.len() >= self.passes.len() {
                self.passes = passes;
            }
        }
        raise_to(&mut self.input, u.input_tokens);
        raise_to(&mut self.output, u.output_tokens);
        raise_to(&mut self.cache_creation, u.cache_creation_input_tokens);
        raise_to(&mut self.cache_read, u.cache_read_input_tokens);
        raise_to(
            &mut self.web_search,
            u.server_tool_use.and_then(|s| s.web_search_requests),
        );
        if let Some(split) = u.cache_creation {
            // The split is one partition of the cache writes: a later one replaces it whole
            // (for the fields it carries) unless it adds up to less. Raising each part apart
            // could make the parts outgrow their total.
            let w5 = split.ephemeral_5m_input_tokens.or(self.ephemeral_5m);
            let w1 = split.ephemeral_1h_input_tokens.or(self.ephemeral_1h);
            let sum =
                |a: Option<u64>, b: Option<u64>| a.unwrap_or(0).saturating_add(b.unwrap_or(0));
            if sum(w5, w1) >= sum(self.ephemeral_5m, self.ephemeral_1h) {
                self.ephemeral_5m = w5;
                self.ephemeral_1h = w1;
            }
        }
    }

    /// Puts the counts, and the speed they were served at, in `result`.
    fn settle(&self, result: &mut MeterResult) {
        result.usage = self.usage();
        result.service_tier = self.speed;
        result.sub_usage.clone_from(&self.passes);
    }

    fn usage(&self) -> TokenUsage {
        let total = self.cache_creation.unwrap_or(0);
        let (write_5m, write_1h) = if self.ephemeral_5m.is_none() && self.ephemeral_1h.is_none() {
            // Before the TTL split existed every cache write was a 5-minute one.
            (total, 0)
        } else {
            let w5 = self.ephemeral_5m.unwrap_or(0);
            let w1 = self.ephemeral_1h.unwrap_or(0);
            // The split sums to the total; should a later total outgrow a stale split, bill the
            // rest at the 5-minute price rather than lose it.
            let rest = total.saturating_sub(w5.saturating_add(w1));
            (w5.saturating_add(rest), w1)
        };
        TokenUsage {
            input_tokens: self.input.unwrap_or(0),
            output_tokens: self.output.unwrap_or(0),
            cache_write_5m_tokens: write_5m,
            cache_write_1h_tokens: write_1h,
            cache_read_tokens: self.cache_read.unwrap_or(0),
            reasoning_tokens: 0,
            web_search_requests: self.web_search.unwrap_or(0),
        }
    }
}

/// Gemini counters, field by field: the highest reported (usageMetadata is cumulative).
#[derive(Debug, Default)]
struct GeminiCounts {
    prompt: Option<u64>,
    cached: Option<u64>,
    candidates: Option<u64>,
    thoughts: Option<u64>,
    tool_use: Option<u64>,
    /// Distinct Google Search queries grounding ran, over every chunk that listed any.
    searches: SearchQueries,
}

impl GeminiCounts {
    fn merge(&mut self, u: GeminiUsageWire) {
        raise_to(&mut self.prompt, u.prompt_token_count);
        raise_to(&mut self.cached, u.cached_content_token_count);
        raise_to(&mut self.candidates, u.candidates_token_count);
        raise_to(&mut self.thoughts, u.thoughts_token_count);
        raise_to(&mut self.tool_use, u.tool_use_prompt_token_count);
    }

    fn usage(&self) -> TokenUsage {
        let cached = self.cached.unwrap_or(0);
        let thoughts = self.thoughts.unwrap_or(0);
        TokenUsage {
            // promptTokenCount includes cachedContentTokenCount; tool-use prompts (e.g. search
            // grounding) are billed as input.
            input_tokens: self
                .prompt
                .unwrap_or(0)
                .saturating_sub(cached)
                .saturating_add(self.tool_use.unwrap_or(0)),
            // Thinking is billed at the output price.
            output_tokens: self.candidates.unwrap_or(0).saturating_add(thoughts),
            cache_write_5m_tokens: 0,
            cache_write_1h_tokens: 0,
            cache_read_tokens: cached,
            reasoning_tokens: thoughts,
            // Grounding with Google Search: the distinct queries it ran (Gemini 3 bills each;
            // Gemini 2.5 bills the prompt, once, when it ran any).
            web_search_requests: self.searches.count().unwrap_or(0),
        }
    }
}

fn chat_usage(u: &ChatUsageWire) -> TokenUsage {
    let (input, read, written) =
        split_openai_input(u.prompt_tokens, u.prompt_tokens_details.as_ref());
    TokenUsage {
        input_tokens: input,
        output_tokens: u.completion_tokens.unwrap_or(0),
        cache_write_5m_tokens: written,
        cache_write_1h_tokens: 0,
        cache_read_tokens: read,
        reasoning_tokens: reasoning_tokens(u.completion_tokens_details.as_ref()),
        web_search_requests: 0,
    }
}

fn responses_usage(u: &ResponsesUsageWire) -> TokenUsage {
    let (input, read, written) =
        split_openai_input(u.input_tokens, u.input_tokens_details.as_ref());
    TokenUsage {
        input_tokens: input,
        output_tokens: u.output_tokens.unwrap_or(0),
        cache_write_5m_tokens: written,
        cache_write_1h_tokens: 0,
        cache_read_tokens: read,
        reasoning_tokens: reasoning_tokens(u.output_tokens_details.as_ref()),
        // Not in `usage`: counted from the output items or the stream's events.
        web_search_requests: 0,
    }
}

/// An OpenAI input count split into (uncached, cache reads, cache writes): the count includes
/// both cached parts. Writes, which GPT-5.6 and later bill at 1.25× input, take the cache
/// write slot whose default price that is (`cache_write_5m`, whatever the cache's lifetime).
fn split_openai_input(total: Option<u64>, details: Option<&CachedTokensWire>) -> (u64, u64, u64) {
    let total = total.unwrap_or(0);
    let read = details.and_then(|d| d.cached_tokens).unwrap_or(0);
    // Never more than the count leaves: a malformed detail must not bill tokens twice.
    let written = details
        .and_then(|d| d.cache_write_tokens)
        .unwrap_or(0)
        .min(total.saturating_sub(read));
    (
        total.saturating_sub(read).saturating_sub(written),
        read,
        written,
    )
}

fn reasoning_tokens(d: Option<&ReasoningTokensWire>) -> u64 {
    d.and_then(|d| d.reasoning_tokens).unwrap_or(0)
}

fn anthropic_event(st: &mut StreamState, ev: SseEvent<'_>) {
    // Usage events are small: a dropped one is a content block.
    if ev.truncated {
        return;
    }
    match event_name(&ev) {
        "message_start" => {
            let message = scan_anthropic_start(ev.data).or_else(|| {
                serde_json::from_slice::<AnthropicMessageStartWire<'_>>(ev.data)
                    .ok()
                    .map(|start| AnthropicMessage::from(start.message))
            });
            let Some(message) = message else { return };
            set_once_bytes(&mut st.result.response_id, message.id);
            set_once_bytes(&mut st.result.model, message.model);
            if let Some(usage) = message.usage {
                st.anthropic.merge(usage);
                st.anthropic.settle(&mut st.result);
            }
        }
        "message_delta" => {
            let usage = scan_anthropic_delta(ev.data).or_else(|| {
                serde_json::from_slice::<AnthropicMessageDeltaWire>(ev.data)
                    .ok()
                    .map(|delta| delta.usage)
            });
            if let Some(Some(usage)) = usage {
                st.anthropic.merge(usage);
                st.anthropic.settle(&mut st.result);
            }
        }
        "message_stop" => st.result.complete = true,
        "error" => st.result.upstream_error = Some(error_event_kind(ev.data)),
        "content_block_delta" => count_delta(st),
        // A search Anthropic runs opens a block of its own (a few blocks a message: two
        // searches of the event, nothing parsed).
        "content_block_start"
            if SERVER_TOOL_USE.find(ev.data).is_some() && WEB_SEARCH.find(ev.data).is_some() =>
        {
            st.searches_started = st.searches_started.saturating_add(1);
            raise_to(&mut st.anthropic.web_search, Some(st.searches_started));
            st.anthropic.settle(&mut st.result);
        }
        // content_block_stop, ping: nothing to meter, and nothing parsed.
        _ => {}
    }
}

fn chat_event(st: &mut StreamState, ev: SseEvent<'_>) {
    // The usage chunk is small: a dropped chunk is content.
    if ev.truncated {
        return;
    }
    let data = ev.data.trim_ascii();
    if data == b"[DONE]" {
        st.result.complete = true;
        return;
    }
    // An error chunk is no piece of the answer: it is not counted as output.
    let error = ev.event == "error" || ERROR_KEY.find(data).is_some();
    if !error {
        count_delta(st);
    }
    // Only the first chunk (id, model), the usage chunk and errors are parsed; content chunks
    // cost two memmem scans.
    let worth_parsing = !st.seen_first_chunk || error || has_non_null_usage(data);
    if !worth_parsing {
        return;
    }
    st.seen_first_chunk = true;
    let Ok(chunk) = serde_json::from_slice::<ChatWire<'_>>(data) else {
        if ev.event == "error" {
            st.result.upstream_error = Some(error_event_kind(data));
        }
        return;
    };
    set_once(&mut st.result.response_id, chunk.id);
    set_once(&mut st.result.model, chunk.model);
    set_tier(&mut st.result.service_tier, chunk.service_tier);
    if let Some(usage) = &chunk.usage {
        st.seen_usage = true;
        st.result.usage = chat_usage(usage);
        // Some compatible upstreams repeat usage on every chunk; only the usage-only chunk
        // that OpenAI sends last ends the stream.
        if is_empty_array(chunk.choices) {
            st.result.complete = true;
        }
    }
    if let Some(error) = chunk.error {
        st.result.upstream_error = Some(error.kind());
    } else if ev.event == "error" {
        st.result.upstream_error = Some(error_event_kind(data));
    }
}

fn responses_event(st: &mut StreamState, ev: SseEvent<'_>) {
    let name = event_name(&ev);
    let terminal = matches!(
        name,
        "response.completed" | "response.incomplete" | "response.failed"
    );
    if ev.truncated {
        // A terminal event repeating a huge output (base64 image_generation results): its usage
        // is near its end. (A dropped event without `event:` line has no name left to go by.)
        if terminal {
            if let Some(usage) = responses_dropped_usage(ev.data) {
                set_responses_usage(st, &usage);
                st.result.complete = true;
                // The tier follows the output in the response object: in the kept tail too.
                if let Some(tier) = dropped_service_tier(ev.data) {
                    st.result.service_tier = Some(tier);
                }
                if name == "response.failed" {
                    st.result.upstream_error = Some("response_failed".into());
                }
            }
        }
        return;
    }
    match name {
        "response.created"
        | "response.in_progress"
        | "response.completed"
        | "response.incomplete"
        | "response.failed" => {
            if !terminal && st.result.response_id.is_some() && st.result.model.is_some() {
                return;
            }
            let Ok(event) = serde_json::from_slice::<ResponseEventWire<'_>>(ev.data) else {
                return;
            };
            let Some(response) = event.response else {
                return;
            };
            set_once(&mut st.result.response_id, response.id);
            set_once(&mut st.result.model, response.model);
            if !terminal {
                return;
            }
            set_tier(&mut st.result.service_tier, response.service_tier);
            if let Some(usage) = &response.usage {
                set_responses_usage(st, usage);
            }
            st.result.complete = true;
            if name == "response.failed" {
                let kind = response.error.map(ErrorWire::kind);
                st.result.upstream_error = Some(kind.unwrap_or_else(|| "response_failed".into()));
            }
        }
        "error" => st.result.upstream_error = Some(error_event_kind(ev.data)),
        // One per search OpenAI ran (and bills), by name alone: nothing in it is read.
        "response.web_search_call.completed" => {
            let searches = &mut st.result.usage.web_search_requests;
            *searches = searches.saturating_add(1);
        }
        name if is_text_delta(name) => count_delta(st),
        // Item events: nothing to meter, and nothing parsed.
        _ => {}
    }
}

/// The usage a Responses terminal event reported, with the web searches counted so far from
/// their own events (the usage object carries no count of them).
fn set_responses_usage(st: &mut StreamState, u: &ResponsesUsageWire) {
    st.result.usage = TokenUsage {
        web_search_requests: st.result.usage.web_search_requests,
        ..responses_usage(u)
    };
}

/// A Responses `*.delta` event whose `delta` is text (output, reasoning summary, refusal,
/// function call arguments, audio transcript), not base64 audio.
fn is_text_delta(name: &str) -> bool {
    // The usual one first: a comparison, where the rest is two scans of the name.
    name == "response.output_text.delta"
        || (name.ends_with(".delta") && (!name.contains("audio") || name.contains("transcript")))
}

/// Counts a delta event: no part of it is read (the count only serves an estimate when the
/// usage never came, and reading each event's text would cost the meter a third of its speed).
fn count_delta(st: &mut StreamState) {
    st.text_deltas = st.text_deltas.saturating_add(1);
}

/// The response's `service_tier` in the last bytes of a dropped terminal event: the last
/// `"service_tier"` key followed by a plain string.
fn dropped_service_tier(tail: &[u8]) -> Option<ServiceTier> {
    SERVICE_TIER_KEY
        .find_iter(tail)
        .filter(|&at| json_scan::unescaped(tail, at))
        .filter_map(|at| {
            let rest = tail[at + b"\"service_tier\"".len()..].trim_ascii_start();
            let value = rest
                .strip_prefix(b":")?
                .trim_ascii_start()
                .strip_prefix(b"\"")?;
            let end = memchr(b'"', value)?;
            let name = std::str::from_utf8(&value[..end]).ok()?;
            Some(ServiceTier::from_wire(name))
        })
        .last()
}

/// The response's `usage` in the last bytes of a dropped terminal event: the last `"usage"` key
/// whose value is a whole object there.
fn responses_dropped_usage(tail: &[u8]) -> Option<ResponsesUsageWire> {
    let mut found = None;
    for at in USAGE_KEY.find_iter(tail) {
        if !json_scan::unescaped(tail, at) {
            continue;
        }
        let rest = tail[at + b"\"usage\"".len()..].trim_ascii_start();
        let Some(value) = rest.strip_prefix(b":").map(<[u8]>::trim_ascii_start) else {
            continue;
        };
        if value.first() != Some(&b'{') {
            continue;
        }
        if let json_scan::Scanned::End(end) = json_scan::ValueEnd::default().scan(value, 0) {
            if let Ok(usage) = serde_json::from_slice::<ResponsesUsageWire>(&value[..end]) {
                found = Some(usage);
            }
        }
    }
    found
}

fn gemini_event(st: &mut StreamState, ev: SseEvent<'_>) {
    // Each chunk carries a piece of the answer (Gemini 3 reports the usage in the last one
    // only): a cut stream is billed at least a token a chunk.
    if ev.truncated {
        count_delta(st);
        // A chunk made huge by inline data: its usageMetadata follows the candidates.
        let chunk = USAGE_METADATA_KEY
            .find_iter(ev.data)
            .last()
            .and_then(|at| scan_gemini_from(ev.data, at));
        if let Some(chunk) = chunk {
            apply_gemini_chunk(&mut st.result, &mut st.gemini, chunk);
        }
        return;
    }
    // Every Gemini chunk carries the cumulative usageMetadata, so every chunk is read: from its
    // usageMetadata key to its end when that is enough, else by the structure scanner, which
    // skips the candidates' content, else by serde when the scanner is not sure (an escaped
    // key, a count that is not plain digits).
    if let Some(chunk) = read_gemini_chunk(ev.data, &st.result) {
        if chunk.error.is_none() {
            count_delta(st);
        }
        apply_gemini_chunk(&mut st.result, &mut st.gemini, chunk);
    }
}

/// One Gemini chunk (an SSE event's data or an array element), read by the cheapest reader
/// that is sure; `None` when it is not JSON of that shape.
#[inline]
fn read_gemini_chunk<'a>(data: &'a [u8], so_far: &MeterResult) -> Option<GeminiChunk<'a>> {
    match scan_gemini_tail(data, so_far).or_else(|| scan_gemini_chunk(data)) {
        Some(chunk) => Some(chunk),
        None => serde_json::from_slice::<GeminiChunkWire<'_>>(data)
            .ok()
            .map(GeminiChunk::from),
    }
}

/// The common Gemini chunk, `{"candidates": [...], "usageMetadata": {...}, "modelVersion": ..,
/// "responseId": ..}` with no finish yet, read from its last `"usageMetadata"` key to its end
/// without walking the candidates. `None` when that is not enough: the bytes of a finish or
/// block reason or of an error appear before it, the key is not proven a top-level member, a
/// member after it needs the full scan, or the model or response id that `so_far` still lacks
/// is not after it. (Like every byte-wise key test here, a key that spells those names with
/// `\u` escapes is not recognised; upstreams do not escape ASCII letters.)
#[inline]
fn scan_gemini_tail<'a>(data: &'a [u8], so_far: &MeterResult) -> Option<GeminiChunk<'a>> {
    // The last occurrence (a forward search is vectorised; a reverse one is not).
    let at = USAGE_METADATA_KEY.find_iter(data).last()?;
    // Before the key (the candidates): the bytes of those names anywhere send the chunk to the
    // full scan. After it, the member walk below sees every top-level key.
    let before = &data[..at];
    if REASON_KEY_END.find(before).is_some()
        || ERROR_KEY.find(before).is_some()
        || WEB_SEARCH_QUERIES_KEY.find(before).is_some()
    {
        return None;
    }
    let chunk = scan_gemini_from(data, at)?;
    if (so_far.model.is_none() && chunk.model_version.is_none())
        || (so_far.response_id.is_none() && chunk.response_id.is_none())
    {
        return None;
    }
    Some(chunk)
}

/// The members of a Gemini chunk from its `"usageMetadata"` key at `at` to its end; `None`
/// unless they close the chunk's object (which proves the key top-level) and hold no member
/// that needs the full scan.
#[inline]
fn scan_gemini_from(data: &[u8], at: usize) -> Option<GeminiChunk<'_>> {
    if !json_scan::unescaped(data, at) {
        return None;
    }
    let mut chunk = GeminiChunk::default();
    json_scan::for_each_member_to_end(data, at, |key, value| {
        match key {
            // Out of the usual order: the full scan reads it.
            b"candidates" | b"promptFeedback" | b"error" => None,
            _ => chunk.read_member(key, value),
        }
    })?;
    Some(chunk)
}

/// What the meter takes from one Gemini GenerateContentResponse.
#[derive(Default, Debug, PartialEq)]
struct GeminiChunk<'a> {
    usage: Option<GeminiUsageWire>,
    model_version: Option<&'a [u8]>,
    response_id: Option<&'a [u8]>,
    finished: bool,
    blocked: bool,
    error: Option<ErrorWire>,
    /// Distinct Google Search queries the chunk's candidates list.
    web_searches: SearchQueries,
}

impl<'a> From<GeminiChunkWire<'a>> for GeminiChunk<'a> {
    fn from(c: GeminiChunkWire<'a>) -> Self {
        let mut queries = SearchQueries::default();
        let grounded = c
            .candidates
            .iter()
            .flatten()
            .filter_map(|cand| cand.grounding_metadata);
        for grounding in grounded {
            queries.add_grounding(grounding.get().as_bytes());
        }
        GeminiChunk {
            usage: c.usage_metadata,
            model_version: c.model_version.map(|raw| raw.get().as_bytes()),
            response_id: c.response_id.map(|raw| raw.get().as_bytes()),
            web_searches: queries,
            finished: c
                .candidates
                .iter()
                .flatten()
                .any(|cand| cand.finish_reason.is_some()),
            blocked: c.prompt_feedback.is_some_and(|f| f.block_reason.is_some()),
            error: c.error,
        }
    }
}

impl<'a> GeminiChunk<'a> {
    /// Takes one top-level member of the chunk; `None` when serde must decide.
    #[inline]
    fn read_member(&mut self, key: &[u8], value: &'a [u8]) -> Option<()> {
        match key {
            b"usageMetadata" => self.usage = scan_gemini_usage(value)?,
            b"modelVersion" => self.model_version = non_null(value),
            b"responseId" => self.response_id = non_null(value),
            b"candidates" if value != b"null" => {
                let mut queries = SearchQueries::default();
                json_scan::for_each_element(value, |candidate| {
                    json_scan::for_each_member(candidate, |key, value| {
                        match key {
                            b"finishReason" if value != b"null" => self.finished = true,
                            // Rare, and its shape not trusted: read as the serde path reads it.
                            b"groundingMetadata" => queries.add_grounding(value),
                            _ => {}
                        }
                        Some(())
                    })
                })?;
                self.web_searches = queries;
            }
            b"promptFeedback" if value != b"null" => {
                json_scan::for_each_member(value, |key, value| {
                    if key == b"blockReason" && value != b"null" {
                        self.blocked = true;
                    }
                    Some(())
                })?;
            }
            // Rare: parsed in full.
            b"error" => self.error = serde_json::from_slice::<Option<ErrorWire>>(value).ok()?,
            _ => {}
        }
        Some(())
    }
}

/// Reads a Gemini chunk with [`json_scan`]; `None` when serde must decide.
#[inline]
fn scan_gemini_chunk(data: &[u8]) -> Option<GeminiChunk<'_>> {
    let mut chunk = GeminiChunk::default();
    json_scan::for_each_member(data, |key, value| chunk.read_member(key, value))?;
    Some(chunk)
}

/// `usageMetadata` read with [`json_scan`]: `Some(None)` for `null`.
#[inline]
fn scan_gemini_usage(value: &[u8]) -> Option<Option<GeminiUsageWire>> {
    if value == b"null" {
        return Some(None);
    }
    let mut usage = GeminiUsageWire::default();
    json_scan::for_each_member(value, |key, value| {
        let slot = match key {
            b"promptTokenCount" => &mut usage.prompt_token_count,
            b"cachedContentTokenCount" => &mut usage.cached_content_token_count,
            b"candidatesTokenCount" => &mut usage.candidates_token_count,
            b"thoughtsTokenCount" => &mut usage.thoughts_token_count,
            b"toolUsePromptTokenCount" => &mut usage.tool_use_prompt_token_count,
            _ => return Some(()),
        };
        *slot = json_scan::opt_u64(value)?;
        Some(())
    })?;
    Some(Some(usage))
}

/// A raw value unless it is `null` (as serde reads `Option<&RawValue>`).
fn non_null(value: &[u8]) -> Option<&[u8]> {
    (value != b"null").then_some(value)
}

#[inline]
fn apply_gemini_chunk(result: &mut MeterResult, counts: &mut GeminiCounts, c: GeminiChunk<'_>) {
    set_once_bytes(&mut result.response_id, c.response_id);
    set_once_bytes(&mut result.model, c.model_version);
    counts.searches.union(&c.web_searches);
    let counted = c.usage.is_some() || c.web_searches.count().is_some();
    if let Some(usage) = c.usage {
        counts.merge(usage);
    }
    if counted {
        result.usage = counts.usage();
    }
    // Sticky: a chunk after the finishing one may only refine the counts.
    if c.finished || c.blocked {
        result.complete = true;
    }
    if let Some(error) = c.error {
        result.upstream_error = Some(error.kind());
    }
}

fn parse_anthropic_json(body: &[u8]) -> Option<MeterResult> {
    let message = scan_anthropic_message(body).or_else(|| {
        serde_json::from_slice::<AnthropicMessageWire<'_>>(body)
            .ok()
            .map(AnthropicMessage::from)
    })?;
    let mut result = MeterResult {
        complete: true,
        ..MeterResult::default()
    };
    set_once_bytes(&mut result.response_id, message.id);
    set_once_bytes(&mut result.model, message.model);
    if let Some(usage) = message.usage {
        let mut counts = AnthropicCounts::default();
        counts.merge(usage);
        counts.settle(&mut result);
    }
    result.upstream_error = message.error.map(ErrorWire::kind);
    Some(result)
}

/// What the meters take from an Anthropic message (the JSON body, or message_start's
/// `message`).
#[derive(Default, Debug, PartialEq)]
struct AnthropicMessage<'a> {
    id: Option<&'a [u8]>,
    model: Option<&'a [u8]>,
    usage: Option<AnthropicUsageWire>,
    error: Option<ErrorWire>,
}

impl<'a> From<AnthropicMessageWire<'a>> for AnthropicMessage<'a> {
    fn from(m: AnthropicMessageWire<'a>) -> Self {
        AnthropicMessage {
            id: m.id.map(|raw| raw.get().as_bytes()),
            model: m.model.map(|raw| raw.get().as_bytes()),
            usage: m.usage,
            error: m.error,
        }
    }
}

/// Keys a scan has read. serde refuses an object that repeats a field it reads, so a scan
/// leaves such an object to serde instead of picking one of the values.
#[derive(Default)]
struct Seen(u32);

impl Seen {
    /// `None` when key number `bit` was read before.
    fn first(&mut self, bit: u32) -> Option<()> {
        let mask = 1 << bit;
        if self.0 & mask != 0 {
            return None;
        }
        self.0 |= mask;
        Some(())
    }
}

/// An Anthropic message read with [`json_scan`] (its `content` is skipped, not parsed);
/// `None` when serde must decide.
fn scan_anthropic_message(data: &[u8]) -> Option<AnthropicMessage<'_>> {
    let mut message = AnthropicMessage::default();
    let mut seen = Seen::default();
    json_scan::for_each_member(data, |key, value| {
        match key {
            b"id" => {
                seen.first(0)?;
                message.id = non_null(value);
            }
            b"model" => {
                seen.first(1)?;
                message.model = non_null(value);
            }
            b"usage" => {
                seen.first(2)?;
                message.usage = scan_anthropic_usage(value)?;
            }
            // Rare: parsed in full.
            b"error" => {
                seen.first(3)?;
                message.error = serde_json::from_slice::<Option<ErrorWire>>(value).ok()?;
            }
            _ => {}
        }
        Some(())
    })?;
    Some(message)
}

/// The `message` of a message_start event, read with [`json_scan`].
fn scan_anthropic_start(data: &[u8]) -> Option<AnthropicMessage<'_>> {
    let mut message = None;
    json_scan::for_each_member(data, |key, value| {
        if key == b"message" {
            if message.is_some() {
                return None;
            }
            message = Some(scan_anthropic_message(value)?);
        }
        Some(())
    })?;
    message
}

/// The `usage` of a message_delta event, read with [`json_scan`]: `Some(None)` without one.
fn scan_anthropic_delta(data: &[u8]) -> Option<Option<AnthropicUsageWire>> {
    let mut usage = None;
    let mut seen = Seen::default();
    json_scan::for_each_member(data, |key, value| {
        if key == b"usage" {
            seen.first(0)?;
            usage = scan_anthropic_usage(value)?;
        }
        Some(())
    })?;
    Some(usage)
}

/// Anthropic `usage` read with [`json_scan`]: `Some(None)` for `null`.
fn scan_anthropic_usage(value: &[u8]) -> Option<Option<AnthropicUsageWire>> {
    if value == b"null" {
        return Some(None);
    }
    let mut usage = AnthropicUsageWire::default();
    let mut seen = Seen::default();
    json_scan::for_each_member(value, |key, value| {
        let (bit, slot) = match key {
            b"input_tokens" => (0, &mut usage.input_tokens),
            b"output_tokens" => (1, &mut usage.output_tokens),
            b"cache_creation_input_tokens" => (2, &mut usage.cache_creation_input_tokens),
            b"cache_read_input_tokens" => (3, &mut usage.cache_read_input_tokens),
            b"cache_creation" => {
                seen.first(4)?;
                usage.cache_creation = scan_anthropic_cache_creation(value)?;
                return Some(());
            }
            b"server_tool_use" => {
                seen.first(5)?;
                usage.server_tool_use = scan_anthropic_server_tool_use(value)?;
                return Some(());
            }
            b"iterations" => {
                seen.first(6)?;
                usage.iterations = scan_anthropic_iterations(value)?;
                return Some(());
            }
            b"speed" => {
                seen.first(7)?;
                // Rare and short: serde reads the string, escapes and all.
                usage.speed = serde_json::from_slice::<Option<String>>(value).ok()?;
                return Some(());
            }
            _ => return Some(()),
        };
        seen.first(bit)?;
        *slot = json_scan::opt_u64(value)?;
        Some(())
    })?;
    Some(Some(usage))
}

/// Anthropic `usage.iterations` read with [`json_scan`]: `Some(None)` for `null`.
fn scan_anthropic_iterations(value: &[u8]) -> Option<Option<Vec<AnthropicIterationWire>>> {
    if value == b"null" {
        return Some(None);
    }
    let mut passes = Vec::new();
    json_scan::for_each_element(value, |element| {
        let mut pass = AnthropicIterationWire::default();
        let mut seen = Seen::default();
        json_scan::for_each_member(element, |key, value| {
            let (bit, slot) = match key {
                b"type" => {
                    seen.first(0)?;
                    // Rare and short: serde reads the string, escapes and all.
                    pass.kind = serde_json::from_slice::<Option<String>>(value).ok()?;
                    return Some(());
                }
                b"model" => {
                    seen.first(5)?;
                    pass.model = serde_json::from_slice::<Option<String>>(value).ok()?;
                    return Some(());
                }
                b"input_tokens" => (1, &mut pass.input_tokens),
                b"output_tokens" => (2, &mut pass.output_tokens),
                b"cache_creation_input_tokens" => (3, &mut pass.cache_creation_input_tokens),
                b"cache_read_input_tokens" => (4, &mut pass.cache_read_input_tokens),
                b"cache_creation" => {
                    seen.first(6)?;
                    pass.cache_creation = scan_anthropic_cache_creation(value)?;
                    return Some(());
                }
                _ => return Some(()),
            };
            seen.first(bit)?;
            *slot = json_scan::opt_u64(value)?;
            Some(())
        })?;
        passes.push(pass);
        Some(())
    })?;
    Some(Some(passes))
}

/// Anthropic `usage.cache_creation` read with [`json_scan`]: `Some(None)` for `null`.
fn scan_anthropic_cache_creation(value: &[u8]) -> Option<Option<AnthropicCacheCreationWire>> {
    if value == b"null" {
        return Some(None);
    }
    let mut split = AnthropicCacheCreationWire::default();
    let mut seen = Seen::default();
    json_scan::for_each_member(value, |key, value| {
        let (bit, slot) = match key {
            b"ephemeral_5m_input_tokens" => (0, &mut split.ephemeral_5m_input_tokens),
            b"ephemeral_1h_input_tokens" => (1, &mut split.ephemeral_1h_input_tokens),
            _ => return Some(()),
        };
        seen.first(bit)?;
        *slot = json_scan::opt_u64(value)?;
        Some(())
    })?;
    Some(Some(split))
}

/// Anthropic `usage.server_tool_use` read with [`json_scan`]: `Some(None)` for `null`.
fn scan_anthropic_server_tool_use(value: &[u8]) -> Option<Option<AnthropicServerToolUseWire>> {
    if value == b"null" {
        return Some(None);
    }
    let mut tools = AnthropicServerToolUseWire::default();
    let mut seen = Seen::default();
    json_scan::for_each_member(value, |key, value| {
        if key == b"web_search_requests" {
            seen.first(0)?;
            tools.web_search_requests = json_scan::opt_u64(value)?;
        }
        Some(())
    })?;
    Some(Some(tools))
}

fn parse_chat_json(body: &[u8]) -> Option<MeterResult> {
    let chat = serde_json::from_slice::<ChatWire<'_>>(body).ok()?;
    let mut result = MeterResult {
        complete: true,
        ..MeterResult::default()
    };
    set_once(&mut result.response_id, chat.id);
    set_once(&mut result.model, chat.model);
    set_tier(&mut result.service_tier, chat.service_tier);
    if let Some(usage) = &chat.usage {
        result.usage = chat_usage(usage);
    }
    result.upstream_error = chat.error.map(ErrorWire::kind);
    Some(result)
}

fn parse_responses_json(body: &[u8]) -> Option<MeterResult> {
    let response = serde_json::from_slice::<ResponseWire<'_>>(body).ok()?;
    let mut result = MeterResult {
        complete: true,
        ..MeterResult::default()
    };
    set_once(&mut result.response_id, response.id);
    set_once(&mut result.model, response.model);
    set_tier(&mut result.service_tier, response.service_tier);
    if let Some(usage) = &response.usage {
        result.usage = responses_usage(usage);
    }
    if let Some(output) = response.output {
        result.usage.web_search_requests = count_web_search_calls(output.get().as_bytes());
    }
    result.upstream_error = response.error.map(ErrorWire::kind);
    Some(result)
}

/// Output items of type `web_search_call` (one per search OpenAI ran and bills), found with
/// [`json_scan`] in the `output` serde has already checked: each item's members are walked only
/// up to its `type`, so the rest (a message's text) is skipped, never parsed. 0 when the output
/// is not an array the scanner is sure of.
fn count_web_search_calls(output: &[u8]) -> u64 {
    let mut calls = 0u64;
    let walked = json_scan::for_each_element(output, |item| {
        if output_item_type(item) == Some(b"\"web_search_call\"") {
            calls = calls.saturating_add(1);
        }
        Some(())
    });
    walked.map_or(0, |()| calls)
}

/// The raw `type` of an output item (with its quotes); `None` for an item without one, or that
/// is not an object.
fn output_item_type(item: &[u8]) -> Option<&[u8]> {
    let mut kind = None;
    // The walk stops at the `type` member (the closure's `None`), so its result says nothing.
    let _ = json_scan::for_each_member(item, |key, value| {
        if key == b"type" {
            kind = Some(value);
            return None;
        }
        Some(())
    });
    kind
}

/// A `generateContent` answer (an array goes to [`GeminiArrayMeter`] as it arrives).
fn parse_gemini_json(body: &[u8]) -> Option<MeterResult> {
    let chunk = serde_json::from_slice::<GeminiChunkWire<'_>>(body).ok()?;
    let mut result = MeterResult::default();
    let mut counts = GeminiCounts::default();
    apply_gemini_chunk(&mut result, &mut counts, GeminiChunk::from(chunk));
    result.complete = true;
    Some(result)
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

/// The event's name: the `event:` field, else the leading `"type"` of its JSON data (for
/// proxies that drop `event:` lines; Anthropic and OpenAI put `type` first).
fn event_name<'a>(ev: &SseEvent<'a>) -> &'a str {
    if !ev.event.is_empty() {
        return ev.event;
    }
    leading_type(ev.data).unwrap_or("")
}

/// `T` of data that starts with `{"type":"T"`, without parsing the rest.
fn leading_type(data: &[u8]) -> Option<&str> {
    let rest = data.trim_ascii_start().strip_prefix(b"{")?;
    let rest = rest.trim_ascii_start().strip_prefix(b"\"type\"")?;
    let rest = rest.trim_ascii_start().strip_prefix(b":")?;
    let rest = rest.trim_ascii_start().strip_prefix(b"\"")?;
    let end = memchr2(b'"', b'\\', rest)?;
    if rest[end] != b'"' {
        return None;
    }
    std::str::from_utf8(&rest[..end]).ok()
}

/// Whether `data` has a `"usage"` key whose value is not `null` (a cheap, conservative test:
/// a false positive only costs a JSON parse).
fn has_non_null_usage(data: &[u8]) -> bool {
    USAGE_KEY.find_iter(data).any(|at| {
        let rest = data[at + b"\"usage\"".len()..].trim_ascii_start();
        match rest.strip_prefix(b":") {
            Some(value) => {
                let value = value.trim_ascii_start();
                !value.is_empty() && !value.starts_with(b"null")
            }
            None => false,
        }
    })
}

/// Whether a raw JSON value is `[]` (or absent, as some compatible upstreams send it).
fn is_empty_array(raw: Option<&RawValue>) -> bool {
    let Some(raw) = raw else {
        return true;
    };
    let text = raw.get().as_bytes();
    match text.strip_prefix(b"[") {
        Some(inner) => inner.trim_ascii() == b"]",
        None => false,
    }
}

/// A later report raises a count it carries, never lowers it: the providers' counts are
/// cumulative (Anthropic message_delta, Gemini usageMetadata), so a smaller one is a
/// placeholder, not a correction.
/// The tier a `service_tier` string names; a later one replaces an earlier one (the answer's
/// last word on it is the tier served). Anything but a string leaves it as it was.
fn set_tier(slot: &mut Option<ServiceTier>, raw: Option<&RawValue>) {
    let name = raw
        .map(|r| r.get().trim())
        .and_then(|t| t.strip_prefix('"')?.strip_suffix('"'));
    if let Some(name) = name {
        *slot = Some(ServiceTier::from_wire(name));
    }
}

fn raise_to(slot: &mut Option<u64>, value: Option<u64>) {
    if let Some(v) = value {
        *slot = Some(slot.map_or(v, |old| old.max(v)));
    }
}

/// Keeps the first string reported for a field (ids and models do not change mid-response).
fn set_once(slot: &mut Option<String>, raw: Option<&RawValue>) {
    set_once_bytes(slot, raw.map(|raw| raw.get().as_bytes()));
}

/// [`set_once`] from the raw bytes of a JSON value.
fn set_once_bytes(slot: &mut Option<String>, raw: Option<&[u8]>) {
    if slot.is_some() {
        return;
    }
    // An empty id or model (some compatible upstreams open with a placeholder chunk) names
    // nothing: a later chunk may still.
    if let Some(raw) = raw {
        if let Some(s) = plain_string(raw) {
            if !s.is_empty() {
                *slot = Some(bounded(s.to_owned()));
            }
        } else if let Ok(s) = serde_json::from_slice::<String>(raw) {
            if !s.is_empty() {
                *slot = Some(bounded(s));
            }
        }
    }
}

/// The text of a JSON string without escapes (ids and model names always are), read without
/// serde; `None` for anything else.
fn plain_string(raw: &[u8]) -> Option<&str> {
    let inner = raw.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    if inner.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\') {
        return None;
    }
    std::str::from_utf8(inner).ok()
}

/// Cuts an upstream string to [`MAX_KEPT_STRING`] bytes at a character boundary.
fn bounded(mut s: String) -> String {
    if s.len() > MAX_KEPT_STRING {
        let mut end = MAX_KEPT_STRING;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Removes the usage-only chunk from an OpenAI Chat stream whose client did not ask for it.
/// Complete events pass through in order; only a trailing partial event is held back until its
/// end arrives (clients act on complete events only, so nothing is delayed that matters).
#[derive(Debug, Default)]
pub struct UsageChunkStripper {
    pending: Vec<u8>,
}

impl UsageChunkStripper {
    /// Takes one upstream chunk; returns the bytes to forward now.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(chunk);
        let mut out = Vec::with_capacity(self.pending.len());
        let mut start = 0;
        while let Some((end, sep)) = next_event_end(&self.pending[start..]) {
            let event = &self.pending[start..start + end + sep];
            if !is_usage_only_event(event) {
                out.extend_from_slice(event);
            }
            start += end + sep;
        }
        self.pending.drain(..start);
        out
    }

    /// What is left at the end of the stream (an unterminated last event).
    pub fn finish(&mut self) -> Vec<u8> {
        let rest = std::mem::take(&mut self.pending);
        if is_usage_only_event(&rest) {
            Vec::new()
        } else {
            rest
        }
    }
}

/// Offset and length of the first blank-line event separator (`\n\n` or `\r\n\r\n`).
fn next_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = memchr::memmem::find(buf, b"\n\n").map(|i| (i, 2));
    let crlf = memchr::memmem::find(buf, b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn is_usage_only_event(event: &[u8]) -> bool {
    event
        .split(|&b| b == b'\n')
        .filter_map(|l| l.strip_prefix(b"data:"))
        .any(|d| is_usage_only_chunk(d.trim_ascii()))
}

/// The `sse_usage` filter: feeds every upstream chunk of a successful answer to the protocol's
/// meter (incremental, synchronous, no copy of the stream) and settles the counts at the end.
pub struct SseUsage;

impl crate::chain::ResponseFilter for SseUsage {
    fn name(&self) -> &'static str {
        "sse_usage"
    }

    fn on_response_head(
        &self,
        ctx: &mut crate::context::RequestCtx,
        status: u16,
        headers: &http::HeaderMap,
    ) {
        if !(200..300).contains(&status) {
            return;
        }
        // The content type decides the parser: some upstreams stream without `stream: true`.
        let event_stream = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        ctx.usage.meter = Some(UsageMeter::new(ctx.protocol(), event_stream));
    }

    fn on_body_chunk(
        &self,
        ctx: &mut crate::context::RequestCtx,
        chunk: &[u8],
    ) -> crate::chain::ChunkAction {
        if let Some(m) = ctx.usage.meter.as_mut() {
            m.feed(chunk);
            if ctx.usage.response_id.is_none() {
                // Known early, so the account holding it can be remembered while it streams.
                ctx.usage.response_id = m.streamed_response_id().map(str::to_owned);
            }
        }
        match ctx.usage.strip_usage_chunk.as_mut() {
            Some(s) => crate::chain::ChunkAction::Replace(bytes::Bytes::from(s.push(chunk))),
            None => crate::chain::ChunkAction::Forward,
        }
    }

    fn on_body_end(&self, ctx: &mut crate::context::RequestCtx) -> Option<bytes::Bytes> {
        let rest = ctx.usage.strip_usage_chunk.as_mut()?.finish();
        (!rest.is_empty()).then(|| bytes::Bytes::from(rest))
    }

    fn on_end(&self, ctx: &mut crate::context::RequestCtx) {
        let Some(meter) = ctx.usage.meter.as_mut() else {
            return;
        };
        if meter.gave_up() {
            // An event (or a JSON answer) past the meter's cap was skipped, and any usage in it
            // but what its last bytes held: the record says its counts may not be the
            // upstream's.
            ctx.usage.estimated = true;
            tracing::warn!(request_id = %ctx.request_id, "usage maybe not metered: an answer part past the meter's cap");
        }
        let result = meter.finish();
        let (tokens, absurd) = result.usage.clamped();
        if absurd {
            ctx.usage.estimated = true;
            tracing::warn!(request_id = %ctx.request_id, "upstream usage past any real count, capped");
        }
        ctx.usage.tokens = tokens;
        if result.model.is_some() {
            ctx.usage.upstream_model = result.model;
        }
        ctx.usage.response_id = result.response_id;
        ctx.usage.service_tier = result.service_tier;
        ctx.usage.sub_usage = result.sub_usage;
        for pass in &mut ctx.usage.sub_usage {
            let (tokens, absurd) = pass.tokens.clamped();
            pass.tokens = tokens;
            if absurd {
                ctx.usage.estimated = true;
                tracing::warn!(request_id = %ctx.request_id, "upstream pass usage past any real count, capped");
            }
        }
        if ctx.route.billed && (!result.complete || result.usage.is_empty()) {
            // An answer that ended without its terminal event (a stream closed early, even
            // with clean framing) or that reported no usage at all: what was seen is billed,
            // and the record says its counts may not be the upstream's.
            ctx.usage.estimated = true;
        }
        // OpenAI reports usage only at the end, so a cut answer would otherwise cost nothing:
        // input the upstream did not report is estimated from the request as its cost hold
        // was, and output is at least a token per text delta seen (a Gemini chunk counts as
        // one). Only for a cut answer, or a Chat stream that never reported usage: one that
        // ended as the protocol ends it is billed as it reported (a failed response without usage, a
        // count of zero), and a cut that came as an upstream error before any text was
        // written generated nothing.
        let generated = result.upstream_error.is_none() || meter.text_deltas() > 0;
        // A Chat stream that ended without ever reporting usage, though it wrote text, is
        // estimated alike: its upstream does not report usage in streams.
        let unreported = meter.usage_never_reported()
            && meter.text_deltas() > 0
            && result.upstream_error.is_none();
        let cut = !result.complete && generated;
        if ctx.route.billed && (cut || unreported) {
            // The tier it asked for, as its cost was held, when it was cut before saying
            // which it ran at (a Responses stream names it only in its terminal event).
            if cut
                && ctx.usage.service_tier.is_none()
                && ctx.request.service_tier != crate::cost::ServiceTier::Standard
            {
                ctx.usage.service_tier = Some(ctx.request.service_tier);
            }
            let tokens = &mut ctx.usage.tokens;
            if tokens.input_tokens == 0
                && tokens.cache_read_tokens == 0
                && tokens.cache_write_5m_tokens == 0
                && tokens.cache_write_1h_tokens == 0
            {
                tokens.input_tokens = crate::cost::estimate_input_tokens(ctx.request.body_len);
            }
            let seen = meter.text_deltas();
            tokens.output_tokens = tokens.output_tokens.max(seen);
            ctx.usage.tokens = ctx.usage.tokens.clamped().0;
            tracing::debug!(request_id = %ctx.request_id, complete = result.complete, "usage from an incomplete answer");
        }
        // An error the upstream sent inside a successful answer (an SSE `error` event, a
        // failed response): the record names it.
        ctx.usage.upstream_error = result.upstream_error;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing unwrap is a failing test
mod tests {
    use super::*;

    const ANTHROPIC_STREAM: &[u8] =
        include_bytes!("../../tests/fixtures/streams/anthropic.stream.sse");
    const ANTHROPIC_CACHE_1H_STREAM: &[u8] =
        include_bytes!("../../tests/fixtures/streams/anthropic.cache-1h.stream.sse");
    const ANTHROPIC_JSON: &[u8] = include_bytes!("../../tests/fixtures/streams/anthropic.json");
    const CHAT_STREAM: &[u8] =
        include_bytes!("../../tests/fixtures/streams/openai-chat.stream.sse");
    const CHAT_JSON: &[u8] = include_bytes!("../../tests/fixtures/streams/openai-chat.json");
    const RESPONSES_STREAM: &[u8] =
        include_bytes!("../../tests/fixtures/streams/openai-responses.stream.sse");
    const RESPONSES_JSON: &[u8] =
        include_bytes!("../../tests/fixtures/streams/openai-responses.json");
    const GEMINI_STREAM: &[u8] = include_bytes!("../../tests/fixtures/streams/gemini.stream.sse");
    const GEMINI_JSON: &[u8] = include_bytes!("../../tests/fixtures/streams/gemini.json");
    const GEMINI_ARRAY_JSON: &[u8] =
        include_bytes!("../../tests/fixtures/streams/gemini.array.json");

    type Events = Vec<(String, Vec<u8>)>;

    fn usage(input: u64, output: u64, w5m: u64, w1h: u64, read: u64, reasoning: u64) -> TokenUsage {
        TokenUsage {
            input_tokens: input,
            output_tokens: output,
            cache_write_5m_tokens: w5m,
            cache_write_1h_tokens: w1h,
            cache_read_tokens: read,
            reasoning_tokens: reasoning,
            web_search_requests: 0,
        }
    }

    impl MeterResult {
        /// The result with the tier the answer named.
        fn at(self, tier: ServiceTier) -> MeterResult {
            MeterResult {
                service_tier: Some(tier),
                ..self
            }
        }
    }

    fn done(usage: TokenUsage, model: &str, id: &str) -> MeterResult {
        MeterResult {
            usage,
            model: Some(model.to_owned()),
            response_id: Some(id.to_owned()),
            complete: true,
            upstream_error: None,
            service_tier: None,
            sub_usage: Vec::new(),
        }
    }

    fn parse_chunks<'a>(
        parser: &mut SseParser,
        chunks: impl IntoIterator<Item = &'a [u8]>,
    ) -> Events {
        let mut events = Events::new();
        let mut push = |ev: SseEvent<'_>| {
            if !ev.truncated {
                events.push((ev.event.to_owned(), ev.data.to_vec()));
            }
        };
        for chunk in chunks {
            parser.feed(chunk, &mut push);
        }
        parser.finish(&mut push);
        events
    }

    fn parse_all(input: &[u8]) -> Events {
        parse_chunks(&mut SseParser::new(), [input])
    }

    /// Every way of cutting `input` the tests try: whole, in two at every byte, byte by byte,
    /// and in three around every byte.
    fn splits(input: &[u8]) -> Vec<Vec<&[u8]>> {
        let mut out = vec![vec![input]];
        for cut in 0..=input.len() {
            out.push(vec![&input[..cut], &input[cut..]]);
        }
        out.push(input.chunks(1).collect());
        for cut in 1..input.len() {
            out.push(vec![&input[..cut - 1], &input[cut - 1..cut], &input[cut..]]);
        }
        out
    }

    fn meter(protocol: Protocol, stream: bool, chunks: &[&[u8]]) -> MeterResult {
        let mut meter = UsageMeter::new(protocol, stream);
        for chunk in chunks {
            meter.feed(chunk);
        }
        meter.finish()
    }

    fn owned(events: &[(&str, &str)]) -> Events {
        events
            .iter()
            .map(|(e, d)| ((*e).to_owned(), d.as_bytes().to_vec()))
            .collect()
    }

    // ---- SSE parser ----

    #[test]
    fn sse_parser_follows_the_event_stream_rules_under_any_split() {
        // (name, stream bytes, expected (event, data) pairs)
        type Case<'a> = (&'a str, &'a [u8], &'a [(&'a str, &'a str)]);
        let cases: &[Case<'_>] = &[
            ("one event", b"data: a\n\n", &[("", "a")]),
            (
                "named event",
                b"event: ping\ndata: {}\n\n",
                &[("ping", "{}")],
            ),
            (
                "crlf",
                b"event: x\r\ndata: y\r\n\r\nevent: z\r\ndata: w\r\n\r\n",
                &[("x", "y"), ("z", "w")],
            ),
            (
                "cr only",
                b"event: x\rdata: y\r\rdata: w\r\r",
                &[("x", "y"), ("", "w")],
            ),
            (
                "mixed endings",
                b"data: a\r\ndata: b\rdata: c\n\r\n",
                &[("", "a\nb\nc")],
            ),
            (
                "multi-line data",
                b"data: {\"a\":\ndata:  1}\n\n",
                &[("", "{\"a\":\n 1}")],
            ),
            (
                "comments",
                b": keep-alive\n\n:x\ndata: z\n: mid\ndata: q\n\n",
                &[("", "z\nq")],
            ),
            ("no space after colon", b"data:x\n\n", &[("", "x")]),
            ("only one space stripped", b"data:  x \n\n", &[("", " x ")]),
            ("field without colon", b"data\n\n", &[("", "")]),
            (
                "empty data",
                b"data:\n\ndata:\ndata:\n\n",
                &[("", ""), ("", "\n")],
            ),
            (
                "event without data",
                b"event: ping\n\ndata: after\n\n",
                &[("", "after")],
            ),
            (
                "ignored fields",
                b"id: 7\nretry: 10\nfoo: bar\ndata: q\n\n",
                &[("", "q")],
            ),
            (
                "name resets",
                b"event: a\ndata: 1\n\ndata: 2\n\n",
                &[("a", "1"), ("", "2")],
            ),
            (
                "last name wins",
                b"event: a\nevent: b\ndata: 1\n\n",
                &[("b", "1")],
            ),
            ("bom", b"\xEF\xBB\xBFdata: b\n\n", &[("", "b")]),
            ("colon in value", b"data: a: b\n\n", &[("", "a: b")]),
            (
                "flush at finish",
                b"data: a\n\ndata: last",
                &[("", "a"), ("", "last")],
            ),
            (
                "flush without blank line",
                b"event: e\ndata: last\n",
                &[("e", "last")],
            ),
            ("blank lines only", b"\n\n\r\n\r\r", &[]),
            (
                "utf-8",
                "event: é\ndata: 日本 ☕ 🚀\n\n".as_bytes(),
                &[("é", "日本 ☕ 🚀")],
            ),
        ];
        for (name, input, expected) in cases {
            let expected = owned(expected);
            for chunks in splits(input) {
                let got = parse_chunks(&mut SseParser::new(), chunks.iter().copied());
                assert_eq!(got, expected, "{name}: chunks {chunks:?}");
            }
        }
    }

    #[test]
    fn sse_parser_gives_identical_events_for_every_fixture_split() {
        for input in [
            ANTHROPIC_STREAM,
            ANTHROPIC_CACHE_1H_STREAM,
            CHAT_STREAM,
            RESPONSES_STREAM,
            GEMINI_STREAM,
        ] {
            let whole = parse_all(input);
            assert!(whole.len() >= 3);
            for chunks in splits(input) {
                assert_eq!(parse_chunks(&mut SseParser::new(), chunks), whole);
            }
        }
    }

    #[test]
    fn sse_parser_lends_events_from_the_chunk_without_copying() {
        let chunk = b"event: a\ndata: {\"x\":1}\n\nevent: b\ndata: {\"y\":2}\n\n";
        let range = chunk.as_ptr_range();
        let mut parser = SseParser::new();
        let mut seen = 0;
        parser.feed(chunk, |ev| {
            assert!(
                range.contains(&ev.data.as_ptr()),
                "event {} was copied",
                ev.event
            );
            seen += 1;
        });
        assert_eq!(seen, 2);
        assert!(parser.tail.capacity() == 0 && parser.data.capacity() == 0);
    }

    #[test]
    fn sse_parser_carries_only_the_unfinished_line() {
        let mut parser = SseParser::new();
        parser.feed(b"data: complete\n\ndata: partial", |_| {});
        assert_eq!(parser.tail, b"data: partial");
        assert!(parser.data.is_empty());
        let mut got = Vec::new();
        parser.feed(b" end\n\n", |ev| got.push(ev.data.to_vec()));
        assert_eq!(got, vec![b"partial end".to_vec()]);
    }

    #[test]
    fn sse_parser_drops_an_event_over_the_cap_and_recovers() {
        let big = "x".repeat(200);
        let input = format!("data: ok1\n\nevent: huge\ndata: {big}\ndata: {big}\n\ndata: ok2\n\n");
        for chunks in [
            input.as_bytes().chunks(7).collect::<Vec<_>>(),
            input.as_bytes().chunks(1).collect(),
        ] {
            let mut parser = SseParser::with_max_buffer(64);
            let mut events = Events::new();
            let mut dropped = Events::new();
            let mut push = |ev: SseEvent<'_>| {
                let to = if ev.truncated {
                    &mut dropped
                } else {
                    &mut events
                };
                to.push((ev.event.to_owned(), ev.data.to_vec()));
            };
            for chunk in &chunks {
                parser.feed(chunk, &mut push);
                assert!(parser.tail.len() + parser.data.len() <= 64);
            }
            parser.finish(&mut push);
            assert_eq!(events, owned(&[("", "ok1"), ("", "ok2")]));
            assert!(parser.overflowed());
            // The dropped event is handed over as its last bytes, flagged.
            assert_eq!(dropped.len(), 1);
            assert_eq!(dropped[0].0, "huge");
            assert!(dropped[0].1.ends_with(format!("\n{big}").as_bytes()));
        }
    }

    #[test]
    fn sse_parser_bounds_a_line_that_never_ends() {
        let mut parser = SseParser::with_max_buffer(1024);
        let mut events = 0;
        parser.feed(b"data: ", |_| events += 1);
        for _ in 0..10_000 {
            parser.feed(&[b'a'; 100], |_| events += 1);
            assert!(parser.tail.len() <= 1024);
            assert!(parser.dropped_tail.len() <= DROPPED_TAIL);
        }
        assert!(parser.overflowed());
        // The stream goes on normally after the runaway line and its event end; the dropped
        // event comes first, as its last bytes.
        parser.feed(b"\n\ndata: next\n\n", |ev| {
            if ev.truncated {
                assert_eq!(ev.data, [b'a'; DROPPED_TAIL]);
            } else {
                assert_eq!(ev.data, b"next");
            }
            events += 1;
        });
        assert_eq!(events, 2);
    }

    #[test]
    fn sse_parser_caps_copied_multi_line_data_and_long_names() {
        let mut parser = SseParser::with_max_buffer(16);
        let mut events = Events::new();
        let input = b"data: 0123456789\ndata: 0123456789\n\ndata: small\n\n";
        parser.feed(input, |ev| {
            events.push((ev.event.to_owned(), ev.data.to_vec()))
        });
        // The dropped event's bytes are few enough to be handed over whole, flagged.
        assert_eq!(
            events,
            owned(&[("", "0123456789\n0123456789"), ("", "small")])
        );
        assert!(parser.overflowed());

        let mut parser = SseParser::new();
        let name = "n".repeat(MAX_EVENT_NAME + 1);
        let input = format!("event: {name}\ndata: x\n\ndata: y\n\n");
        let got = parse_chunks(&mut parser, [input.as_bytes()]);
        assert_eq!(got, owned(&[("", "y")]));
        assert!(parser.overflowed());
    }

    #[test]
    fn sse_parser_lends_a_large_event_that_fits_one_chunk() {
        // The cap bounds what is carried between chunks, not what a chunk lends.
        let big = "y".repeat(100);
        let input = format!("data: {big}\n\n");
        let got = parse_chunks(&mut SseParser::with_max_buffer(16), [input.as_bytes()]);
        assert_eq!(got, vec![(String::new(), big.into_bytes())]);
    }

    // ---- meters on recorded responses ----

    fn fixture_cases() -> Vec<(&'static str, Protocol, bool, &'static [u8], MeterResult)> {
        vec![
            (
                "anthropic.stream.sse",
                Protocol::Anthropic,
                true,
                ANTHROPIC_STREAM,
                done(
                    usage(12, 187, 1536, 0, 20480, 0),
                    "claude-sonnet-4-5-20250929",
                    "msg_01HCMSeK3sAq9vBQ5o3tW8ZL",
                ),
            ),
            (
                "anthropic.cache-1h.stream.sse",
                Protocol::Anthropic,
                true,
                ANTHROPIC_CACHE_1H_STREAM,
                done(
                    usage(3, 503, 1024, 3072, 0, 0),
                    "claude-opus-4-1-20250805",
                    "msg_01Ek4bWVcW6LcLAwFK2G8nQY",
                ),
            ),
            (
                "anthropic.json",
                Protocol::Anthropic,
                false,
                ANTHROPIC_JSON,
                done(
                    usage(2095, 503, 248, 0, 1800, 0),
                    "claude-haiku-4-5-20251001",
                    "msg_013Zva2CMHLNnXjNJJKqJ2EF",
                ),
            ),
            (
                "openai-chat.stream.sse",
                Protocol::OpenaiChat,
                true,
                CHAT_STREAM,
                done(
                    usage(307, 352, 0, 0, 1536, 256),
                    "gpt-5-mini-2025-08-07",
                    "chatcmpl-CKz1xSWs7bD2lOAcPX4TcbNqC9vfz",
                )
                .at(ServiceTier::Standard),
            ),
            (
                "openai-chat.json",
                Protocol::OpenaiChat,
                false,
                CHAT_JSON,
                done(
                    usage(1476, 350, 0, 0, 1024, 0),
                    "gpt-4.1-2025-04-14",
                    "chatcmpl-CKz4mW0y2WcXLkqDFbI5Sg2uQ8r1H",
                )
                .at(ServiceTier::Standard),
            ),
            (
                "openai-responses.stream.sse",
                Protocol::OpenaiResponses,
                true,
                RESPONSES_STREAM,
                done(
                    usage(366, 412, 0, 0, 4864, 256),
                    "gpt-5-2025-08-07",
                    "resp_68dd3c5f0a1c8190b2f3a0c1d4e5f6a70e2b9c8d7f6a5b4c",
                )
                .at(ServiceTier::Standard),
            ),
            (
                "openai-responses.json",
                Protocol::OpenaiResponses,
                false,
                RESPONSES_JSON,
                done(
                    usage(1278, 1180, 0, 0, 8064, 896),
                    "gpt-5-codex",
                    "resp_68dd40a0b9c481909f8e7d6c5b4a39280e2b9c8d7f6a5b4c",
                )
                .at(ServiceTier::Standard),
            ),
            (
                "gemini.stream.sse",
                Protocol::Gemini,
                true,
                GEMINI_STREAM,
                done(
                    usage(2072, 945, 0, 0, 2048, 734),
                    "gemini-2.5-flash",
                    "mLvdaNWnIvOXz7IPqZ6e6Q0",
                ),
            ),
            (
                "gemini.json",
                Protocol::Gemini,
                false,
                GEMINI_JSON,
                done(
                    // Grounded: one Google Search query.
                    TokenUsage {
                        web_search_requests: 1,
                        ..usage(1336, 1590, 0, 0, 0, 1210)
                    },
                    "gemini-2.5-pro",
                    "3MvdaJ2xBJ6mz7IP8u2SgQs",
                ),
            ),
            (
                "gemini.array.json",
                Protocol::Gemini,
                false,
                GEMINI_ARRAY_JSON,
                done(
                    usage(56, 148, 0, 0, 0, 0),
                    "gemini-2.0-flash",
                    "9MvdaKfLK8Wgz7IPsdaKmAQ",
                ),
            ),
        ]
    }

    #[test]
    fn meters_read_the_recorded_numbers_under_any_split() {
        for (name, protocol, stream, bytes, expected) in fixture_cases() {
            for chunks in splits(bytes) {
                assert_eq!(
                    meter(protocol, stream, &chunks),
                    expected,
                    "{name}: {} chunks",
                    chunks.len()
                );
            }
        }
    }

    #[test]
    fn meters_read_the_same_with_other_line_endings_or_without_event_lines() {
        for (name, protocol, stream, bytes, expected) in fixture_cases() {
            if !stream {
                continue;
            }
            let text = String::from_utf8(bytes.to_vec())
                .unwrap()
                .replace("\r\n", "\n");
            let variants = [
                text.replace('\n', "\r\n"),
                text.replace('\n', "\r"),
                text.lines()
                    .filter(|l| !l.starts_with("event:"))
                    .map(|l| format!("{l}\n"))
                    .collect::<String>(),
                format!(
                    ": connected\n\n{}",
                    text.replace("\n\n", "\n: keep-alive\n\n")
                ),
            ];
            for variant in variants {
                for chunks in [
                    vec![variant.as_bytes()],
                    variant.as_bytes().chunks(5).collect(),
                ] {
                    assert_eq!(
                        meter(protocol, stream, &chunks),
                        expected,
                        "{name}: {variant:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn finish_is_idempotent_and_snapshot_matches() {
        for (name, protocol, stream, bytes, expected) in fixture_cases() {
            let mut m = UsageMeter::new(protocol, stream);
            m.feed(bytes);
            assert_eq!(m.finish(), expected, "{name}");
            assert_eq!(m.finish(), expected, "{name}");
            assert_eq!(m.snapshot(), expected, "{name}");
            assert!(!m.gave_up());
        }
    }

    #[test]
    fn snapshot_of_a_cut_stream_has_what_was_seen() {
        let half = |b: &'static [u8]| &b[..b.len() / 2];
        let cases = [
            (
                Protocol::Anthropic,
                ANTHROPIC_STREAM,
                usage(12, 1, 1536, 0, 20480, 0),
                Some("claude-sonnet-4-5-20250929"),
            ),
            (
                Protocol::OpenaiChat,
                CHAT_STREAM,
                TokenUsage::default(),
                Some("gpt-5-mini-2025-08-07"),
            ),
            (
                Protocol::OpenaiResponses,
                RESPONSES_STREAM,
                TokenUsage::default(),
                Some("gpt-5-2025-08-07"),
            ),
            // Only the first chunk: thoughts so far, no candidates yet.
            (
                Protocol::Gemini,
                GEMINI_STREAM,
                usage(2072, 734, 0, 0, 2048, 734),
                Some("gemini-2.5-flash"),
            ),
        ];
        for (protocol, bytes, expected_usage, model) in cases {
            let mut m = UsageMeter::new(protocol, true);
            m.feed(half(bytes));
            let snap = m.snapshot();
            assert_eq!(snap.usage, expected_usage, "{protocol:?}");
            assert_eq!(snap.model.as_deref(), model, "{protocol:?}");
            assert!(!snap.complete, "{protocol:?}");
            // The rest arrives after all: same totals as the whole stream.
            m.feed(&bytes[bytes.len() / 2..]);
            assert!(m.finish().complete);
        }
        let mut m = UsageMeter::new(Protocol::Anthropic, false);
        m.feed(half(ANTHROPIC_JSON));
        assert_eq!(m.snapshot(), MeterResult::default());
        assert_eq!(m.finish(), MeterResult::default());
    }

    // ---- protocol rules ----

    fn stream_result(protocol: Protocol, text: &str) -> MeterResult {
        let mut m = UsageMeter::new(protocol, true);
        m.feed(text.as_bytes());
        m.finish()
    }

    #[test]
    fn anthropic_scans_read_what_serde_reads_or_leave_it_to_serde() {
        fn serde_message(b: &[u8]) -> Option<AnthropicMessage<'_>> {
            serde_json::from_slice::<AnthropicMessageWire<'_>>(b)
                .ok()
                .map(AnthropicMessage::from)
        }
        let usage = r#"{"input_tokens":12,"cache_creation_input_tokens":7,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":3,"ephemeral_1h_input_tokens":4},"output_tokens":5,"service_tier":"standard"}"#;
        let message = format!(
            r#"{{"id":"msg_01","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{{"type":"text","text":"a \"usage\": {{\"input_tokens\": 999}} ]}}"}},{{"type":"tool_use","id":"t","name":"f","input":{{"usage":{{"input_tokens":888}},"id":"x"}}}}],"stop_reason":"end_turn","usage":{usage}}}"#
        );
        // (body, whether the scan must read it itself)
        let bodies: Vec<(String, bool)> = vec![
            (message.clone(), true),
            (format!(" \n{message}\n"), true),
            (r#"{"id":null,"model":"m","usage":null}"#.into(), true),
            (
                r#"{"usage":{"input_tokens":1,"cache_creation":null}}"#.into(),
                true,
            ),
            (
                r#"{"type":"error","error":{"type":"overloaded_error","message":"x"}}"#.into(),
                true,
            ),
            (
                r#"{"id":"caf\u00e9","model":"m\"x","usage":{"output_tokens":2}}"#.into(),
                true,
            ),
            (
                r#"{"usage":{"output_tokens":2,"server_tool_use":{"web_fetch_requests":1,"web_search_requests":3}}}"#.into(),
                true,
            ),
            (
                r#"{"usage":{"output_tokens":2,"server_tool_use":null}}"#.into(),
                true,
            ),
            (
                r#"{"usage":{"input_tokens":5,"iterations":[{"type":"compaction","input_tokens":180000,"output_tokens":3500,"cache_read_input_tokens":null},{"type":"message","input_tokens":5,"output_tokens":1,"extra":[1,{"a":2}]}]}}"#.into(),
                true,
            ),
            (
                r#"{"usage":{"iterations":null}}"#.into(),
                true,
            ),
            (r#"{"usage":{"iterations":[]}}"#.into(), true),
            ("{}".into(), true),
            // Left to serde: repeated fields, escaped keys, numbers serde reads otherwise.
            (r#"{"id":"a","id":"b"}"#.into(), false),
            (
                r#"{"usage":{"input_tokens":1,"input_tokens":2}}"#.into(),
                false,
            ),
            (r#"{"usage":{"input_tokens":1},"usage":null}"#.into(), false),
            (r#"{"us\u0061ge":{"input_tokens":1}}"#.into(), false),
            (r#"{"usage":{"input_tokens":1.5}}"#.into(), false),
            (r#"{"usage":{"input_tokens":-1}}"#.into(), false),
            (r#"{"usage":{"input_tokens":"1"}}"#.into(), false),
            (r#"{"usage":[1]}"#.into(), false),
            (
                r#"{"usage":{"server_tool_use":{"web_search_requests":1,"web_search_requests":2}}}"#
                    .into(),
                false,
            ),
            (
                r#"{"usage":{"server_tool_use":{"web_search_requests":1.0}}}"#.into(),
                false,
            ),
            ("[]".into(), false),
            ("not json".into(), false),
        ];
        for (body, scanned) in &bodies {
            let b = body.as_bytes();
            let scan = scan_anthropic_message(b);
            assert_eq!(scan.is_some(), *scanned, "{body}");
            if let Some(scan) = scan {
                assert_eq!(Some(scan), serde_message(b), "{body}");
            }
            // message_start carries the same object as `message`.
            let start = format!(r#"{{"type":"message_start","message":{body}}}"#);
            let scan = scan_anthropic_start(start.as_bytes());
            if let Some(scan) = scan {
                let full =
                    serde_json::from_slice::<AnthropicMessageStartWire<'_>>(start.as_bytes())
                        .ok()
                        .map(|s| AnthropicMessage::from(s.message));
                assert_eq!(Some(scan), full, "{start}");
            } else {
                assert!(!scanned, "{start}");
            }
        }
        let read = scan_anthropic_message(message.as_bytes()).unwrap();
        assert_eq!(read.id, Some(&b"\"msg_01\""[..]));
        let u = read.usage.unwrap();
        assert_eq!((u.input_tokens, u.output_tokens), (Some(12), Some(5)));
        assert_eq!(u.cache_creation.unwrap().ephemeral_1h_input_tokens, Some(4));

        // message_delta: only the top-level usage counts.
        for (data, want) in [
            (
                r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","usage":{"output_tokens":1}},"usage":{"output_tokens":42}}"#,
                Some(Some(42)),
            ),
            (
                r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"}}"#,
                Some(None),
            ),
            (r#"{"type":"message_delta","usage":null}"#, Some(None)),
            (
                r#"{"type":"message_delta","usage":{"output_tokens":1},"usage":{"output_tokens":2}}"#,
                None,
            ),
        ] {
            let scan = scan_anthropic_delta(data.as_bytes());
            assert_eq!(
                scan.as_ref()
                    .map(|u| u.as_ref().and_then(|u| u.output_tokens)),
                want,
                "{data}"
            );
            if let Some(scan) = scan {
                let full = serde_json::from_slice::<AnthropicMessageDeltaWire>(data.as_bytes())
                    .unwrap()
                    .usage;
                assert_eq!(scan, full, "{data}");
            }
        }
        // Strings without escapes are read without serde, with the same result.
        for raw in [
            &br#""claude-sonnet-4-5""#[..],
            br#""caf\u00e9""#,
            br#""a\"b""#,
            b"\"\xc3\xa9\"",
            b"\"\xff\"",
            b"12",
        ] {
            let mut fast = None;
            set_once_bytes(&mut fast, Some(raw));
            assert_eq!(fast, serde_json::from_slice::<String>(raw).ok(), "{raw:?}");
        }
    }

    #[test]
    fn anthropic_message_delta_raises_only_the_fields_it_carries() {
        let start = r#"event: message_start
data: {"type":"message_start","message":{"id":"msg_1","model":"claude-sonnet-4-5","usage":{"input_tokens":10,"cache_creation_input_tokens":300,"cache_read_input_tokens":40,"cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":200},"output_tokens":1}}}

"#;
        let cases: &[(&str, &str, TokenUsage)] = &[
            (
                "output only",
                r#"{"output_tokens":77}"#,
                usage(10, 77, 100, 200, 40, 0),
            ),
            (
                "all fields",
                r#"{"input_tokens":11,"cache_creation_input_tokens":300,"cache_read_input_tokens":41,"output_tokens":78}"#,
                usage(11, 78, 100, 200, 41, 0),
            ),
            (
                "null is absent",
                r#"{"input_tokens":null,"output_tokens":5}"#,
                usage(10, 5, 100, 200, 40, 0),
            ),
            (
                "new split",
                r#"{"cache_creation_input_tokens":500,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":500},"output_tokens":9}"#,
                usage(10, 9, 0, 500, 40, 0),
            ),
            (
                "total outgrows a stale split",
                r#"{"cache_creation_input_tokens":350,"output_tokens":9}"#,
                usage(10, 9, 150, 200, 40, 0),
            ),
            (
                "smaller counts are placeholders",
                r#"{"input_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":20}"#,
                usage(10, 20, 100, 200, 40, 0),
            ),
            (
                "a split adding up to less is kept out",
                r#"{"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},"output_tokens":9}"#,
                usage(10, 9, 100, 200, 40, 0),
            ),
        ];
        for (name, delta, expected) in cases {
            let text = format!(
                "{start}event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\"}},\"usage\":{delta}}}\n\nevent: message_stop\ndata: {{\"type\":\"message_stop\"}}\n\n"
            );
            let got = stream_result(Protocol::Anthropic, &text);
            assert_eq!(got.usage, *expected, "{name}");
            assert!(got.complete, "{name}");
        }
    }

    /// Anthropic reports its web searches in `usage.server_tool_use` (cumulative, like the
    /// token counts): the highest count wins, whatever the split, in a stream or a JSON answer.
    #[test]
    fn anthropic_web_searches_are_metered_under_any_split() {
        let stream = concat!(
            "event: message_start\n",
            r#"data: {"type":"message_start","message":{"id":"msg_1","model":"claude-sonnet-4-5","usage":{"input_tokens":10,"output_tokens":1,"server_tool_use":{"web_search_requests":0}}}}"#,
            "\n\nevent: content_block_start\n",
            r#"data: {"type":"content_block_start","index":0,"content_block":{"type":"server_tool_use","id":"srvtoolu_1","name":"web_search","input":{}}}"#,
            "\n\nevent: message_delta\n",
            r#"data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":50,"server_tool_use":{"web_search_requests":3}}}"#,
            "\n\nevent: message_delta\n",
            r#"data: {"type":"message_delta","delta":{},"usage":{"output_tokens":60,"server_tool_use":{"web_search_requests":2}}}"#,
            "\n\nevent: message_stop\n",
            r#"data: {"type":"message_stop"}"#,
            "\n\n",
        );
        let want = TokenUsage {
            web_search_requests: 3,
            ..usage(10, 60, 0, 0, 0, 0)
        };
        for chunks in splits(stream.as_bytes()) {
            let got = meter(Protocol::Anthropic, true, &chunks);
            assert_eq!(got.usage, want, "{chunks:?}");
            assert!(got.complete);
        }
        let json = r#"{"id":"msg_1","type":"message","model":"claude-sonnet-4-5","content":[{"type":"server_tool_use","id":"srvtoolu_1","name":"web_search","input":{"query":"usage"}},{"type":"text","text":"server_tool_use"}],"usage":{"input_tokens":10,"output_tokens":60,"server_tool_use":{"web_search_requests":2}}}"#;
        for chunks in splits(json.as_bytes()) {
            let got = meter(Protocol::Anthropic, false, &chunks);
            assert_eq!(
                got.usage,
                TokenUsage {
                    web_search_requests: 2,
                    ..usage(10, 60, 0, 0, 0, 0)
                }
            );
        }
        // A stream cut before message_delta: the searches whose blocks started (not a client
        // tool that happens to be called web_search).
        let cut = concat!(
            "event: message_start\n",
            r#"data: {"type":"message_start","message":{"id":"msg_1","model":"claude-sonnet-4-5","usage":{"input_tokens":10,"output_tokens":1}}}"#,
            "\n\nevent: content_block_start\n",
            r#"data: {"type":"content_block_start","index":0,"content_block":{"type":"server_tool_use","id":"srvtoolu_1","name":"web_search","input":{}}}"#,
            "\n\nevent: content_block_start\n",
            r#"data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_1","name":"web_search","input":{}}}"#,
            "\n\nevent: content_block_start\n",
            r#"data: {"type":"content_block_start","index":2,"content_block":{"type":"server_tool_use","id":"srvtoolu_2","name":"web_search","input":{}}}"#,
            "\n\n",
        );
        for chunks in splits(cut.as_bytes()) {
            let got = meter(Protocol::Anthropic, true, &chunks);
            assert_eq!(got.usage.web_search_requests, 2, "{chunks:?}");
            assert!(!got.complete);
        }
        // The serde fallback (an escaped key the scanner leaves to it) reads them too.
        let escaped = r#"{"model":"m","us\u0061ge":{"output_tokens":1,"server_tool_use":{"web_search_requests":4}}}"#;
        assert!(scan_anthropic_message(escaped.as_bytes()).is_none());
        let got = meter(Protocol::Anthropic, false, &[escaped.as_bytes()]);
        assert_eq!(got.usage.web_search_requests, 4);
    }

    /// A request that compacted its context ran a summary pass the top-level counts leave
    /// out: its `usage.iterations` entry of type `compaction` is billed on top, streamed or
    /// whole; the answer's own pass (type `message`) is not counted twice; an advisor's passes
    /// come apart, with their model.
    #[test]
    fn anthropic_compaction_passes_are_billed_on_top() {
        let usage_json = r#"{"input_tokens":23000,"output_tokens":1000,"cache_read_input_tokens":100,"iterations":[{"type":"compaction","input_tokens":180000,"output_tokens":3500,"cache_creation_input_tokens":40,"cache_read_input_tokens":60},{"type":"message","input_tokens":23000,"output_tokens":1000}]}"#;
        // The answer's pass is the top-level counts; the summary pass comes apart, on the
        // request's model (priced on its own prompt).
        let want = usage(23_000, 1_000, 0, 0, 100, 0);
        let summary = vec![SubUsage {
            model: None,
            tokens: usage(180_000, 3_500, 40, 0, 60, 0),
        }];
        let json = format!(
            r#"{{"id":"msg_1","type":"message","model":"claude-opus-4-6","content":[{{"type":"compaction","content":"Summary"}},{{"type":"text","text":"ok"}}],"usage":{usage_json}}}"#
        );
        for chunks in splits(json.as_bytes()) {
            let got = meter(Protocol::Anthropic, false, &chunks);
            assert_eq!(got.usage, want, "{chunks:?}");
            assert_eq!(got.sub_usage, summary, "{chunks:?}");
        }
        // The serde fallback adds them alike.
        let escaped = format!(r#"{{"model":"m","us\u0061ge":{usage_json}}}"#);
        assert!(scan_anthropic_message(escaped.as_bytes()).is_none());
        assert_eq!(
            meter(Protocol::Anthropic, false, &[escaped.as_bytes()]).usage,
            want
        );
        // Streamed: the passes come with message_delta's cumulative usage, once or again.
        let stream = format!(
            "event: message_start\ndata: {}\n\nevent: message_delta\ndata: {}\n\nevent: message_delta\ndata: {}\n\nevent: message_stop\ndata: {{\"type\":\"message_stop\"}}\n\n",
            r#"{"type":"message_start","message":{"id":"msg_1","model":"claude-opus-4-6","usage":{"input_tokens":23000,"output_tokens":1,"cache_read_input_tokens":100}}}"#,
            format_args!(r#"{{"type":"message_delta","delta":{{"stop_reason":"end_turn"}},"usage":{usage_json}}}"#),
            format_args!(r#"{{"type":"message_delta","delta":{{}},"usage":{usage_json}}}"#),
        );
        for chunks in splits(stream.as_bytes()) {
            let got = meter(Protocol::Anthropic, true, &chunks);
            assert_eq!(got.usage, want, "{chunks:?}");
            assert_eq!(got.sub_usage, summary, "{chunks:?}");
            assert!(got.complete);
        }
        // An advisor's passes are not the request's model's tokens: they come apart, with
        // their model, to be priced at it; the answer's own pass is not counted twice.
        let advised = r#"{"model":"claude-sonnet-5-5","usage":{"input_tokens":10,"output_tokens":2,"iterations":[{"type":"message","input_tokens":10,"output_tokens":2},{"type":"advisor_message","model":"claude-opus-5-5","input_tokens":5,"output_tokens":7,"cache_read_input_tokens":3,"cache_creation_input_tokens":9,"cache_creation":{"ephemeral_5m_input_tokens":4,"ephemeral_1h_input_tokens":5}},{"type":"advisor_message","input_tokens":1,"output_tokens":1}]}}"#;
        let got = meter(Protocol::Anthropic, false, &[advised.as_bytes()]);
        assert_eq!(got.usage, usage(10, 2, 0, 0, 0, 0));
        assert_eq!(
            got.sub_usage,
            [
                SubUsage {
                    model: Some("claude-opus-5-5".into()),
                    // Its cache writes by TTL, as the pass reports them.
                    tokens: usage(5, 7, 4, 5, 3, 0),
                },
                // No model named: priced as none, never as another.
                SubUsage {
                    model: Some(String::new()),
                    tokens: usage(1, 1, 0, 0, 0, 0),
                },
            ]
        );
        // Streamed: message_delta's cumulative list, repeated, is taken once.
        let delta = format!(
            "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"id\":\"m\",\"model\":\"claude-sonnet-5-5\",\"usage\":{{\"input_tokens\":10,\"output_tokens\":1}}}}}}\n\nevent: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{}},\"usage\":{}}}\n\nevent: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{}},\"usage\":{}}}\n\n",
            &advised[advised.find(r#"{"input_tokens":10"#).unwrap()..advised.len() - 1],
            &advised[advised.find(r#"{"input_tokens":10"#).unwrap()..advised.len() - 1],
        );
        for chunks in splits(delta.as_bytes()) {
            let got = meter(Protocol::Anthropic, true, &chunks);
            assert_eq!(got.sub_usage.len(), 2, "{chunks:?}");
            assert_eq!(got.usage, usage(10, 2, 0, 0, 0, 0));
        }
    }

    /// OpenAI (GPT-5.6 and later) reports the input written to the cache inside the input
    /// count, as it does the cached part: writes are taken out of the uncached input and
    /// billed as cache writes, in Chat and Responses, whole and streamed.
    #[test]
    fn openai_cache_writes_are_split_from_the_input() {
        let want = usage(1_000, 50, 7_000, 0, 2_000, 0);
        let responses = r#"{"id":"resp_1","object":"response","model":"gpt-5.6-sol","status":"completed","output":[],"usage":{"input_tokens":10000,"input_tokens_details":{"cached_tokens":2000,"cache_write_tokens":7000},"output_tokens":50,"output_tokens_details":{"reasoning_tokens":0}}}"#;
        assert_eq!(
            meter(Protocol::OpenaiResponses, false, &[responses.as_bytes()]).usage,
            want
        );
        let completed = format!(
            "event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{responses}}}\n\n"
        );
        for chunks in splits(completed.as_bytes()) {
            assert_eq!(
                meter(Protocol::OpenaiResponses, true, &chunks).usage,
                want,
                "{chunks:?}"
            );
        }
        let chat_usage = r#"{"prompt_tokens":10000,"completion_tokens":50,"prompt_tokens_details":{"cached_tokens":2000,"cache_write_tokens":7000}}"#;
        let chat = format!(
            r#"{{"id":"c","object":"chat.completion","model":"gpt-5.6-sol","choices":[],"usage":{chat_usage}}}"#
        );
        assert_eq!(
            meter(Protocol::OpenaiChat, false, &[chat.as_bytes()]).usage,
            want
        );
        let stream = format!(
            "data: {{\"id\":\"c\",\"model\":\"gpt-5.6-sol\",\"choices\":[{{\"delta\":{{\"content\":\"hi\"}}}}]}}\n\ndata: {{\"id\":\"c\",\"model\":\"gpt-5.6-sol\",\"choices\":[],\"usage\":{chat_usage}}}\n\ndata: [DONE]\n\n"
        );
        assert_eq!(stream_result(Protocol::OpenaiChat, &stream).usage, want);
        // A write count past what the input leaves is cut to it: nothing billed twice.
        let odd = r#"{"model":"m","usage":{"input_tokens":100,"input_tokens_details":{"cached_tokens":60,"cache_write_tokens":70},"output_tokens":1}}"#;
        assert_eq!(
            meter(Protocol::OpenaiResponses, false, &[odd.as_bytes()]).usage,
            usage(0, 1, 40, 0, 60, 0)
        );
    }

    /// The tier an OpenAI answer says it was served at: the last one named (Chat: the usage
    /// chunk; Responses: the terminal event, not the created event's `auto`), whole or
    /// streamed; none named, none recorded.
    #[test]
    fn openai_service_tiers_are_read_from_the_answer() {
        let chat_stream = "data: {\"id\":\"c\",\"model\":\"gpt-5.5\",\"service_tier\":\"priority\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"id\":\"c\",\"model\":\"gpt-5.5\",\"service_tier\":\"priority\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\ndata: [DONE]\n\n";
        assert_eq!(
            stream_result(Protocol::OpenaiChat, chat_stream).service_tier,
            Some(ServiceTier::Priority)
        );
        let responses_stream = concat!(
            "event: response.created\n",
            r#"data: {"type":"response.created","response":{"id":"resp_1","model":"gpt-5.5","service_tier":"auto","usage":null}}"#,
            "\n\nevent: response.completed\n",
            r#"data: {"type":"response.completed","response":{"id":"resp_1","model":"gpt-5.5","service_tier":"flex","usage":{"input_tokens":3,"output_tokens":1}}}"#,
            "\n\n",
        );
        for chunks in splits(responses_stream.as_bytes()) {
            assert_eq!(
                meter(Protocol::OpenaiResponses, true, &chunks).service_tier,
                Some(ServiceTier::Flex)
            );
        }
        let json = br#"{"id":"resp_1","model":"gpt-5.5","service_tier":"priority","usage":{"input_tokens":3,"output_tokens":1}}"#;
        assert_eq!(
            meter(Protocol::OpenaiResponses, false, &[json]).service_tier,
            Some(ServiceTier::Priority)
        );
        let chat_json = br#"{"id":"c","model":"gpt-5.5","service_tier":"default","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#;
        assert_eq!(
            meter(Protocol::OpenaiChat, false, &[chat_json]).service_tier,
            Some(ServiceTier::Standard)
        );
        let unnamed = br#"{"id":"c","model":"m","service_tier":null,"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#;
        assert_eq!(
            meter(Protocol::OpenaiChat, false, &[unnamed]).service_tier,
            None
        );
        // Anthropic's usage.service_tier is not a price tier the relay knows: not read.
        assert_eq!(
            meter(Protocol::Anthropic, false, &[ANTHROPIC_JSON]).service_tier,
            None
        );
    }

    /// Anthropic fast mode: `usage.speed` names it, in a whole answer and in a stream's
    /// message_start or message_delta; the serde fallback reads it too.
    #[test]
    fn anthropic_fast_mode_is_read_from_the_usage() {
        let json = br#"{"id":"msg_1","type":"message","model":"claude-opus-5-5","content":[],"usage":{"input_tokens":10,"output_tokens":2,"service_tier":"standard","speed":"fast"}}"#;
        assert_eq!(
            meter(Protocol::Anthropic, false, &[json]).service_tier,
            Some(ServiceTier::Fast)
        );
        let escaped =
            br#"{"model":"m","us\u0061ge":{"input_tokens":10,"output_tokens":2,"speed":"fast"}}"#;
        assert!(scan_anthropic_message(escaped).is_none());
        assert_eq!(
            meter(Protocol::Anthropic, false, &[escaped]).service_tier,
            Some(ServiceTier::Fast)
        );
        let standard =
            br#"{"model":"m","usage":{"input_tokens":10,"output_tokens":2,"speed":"standard"}}"#;
        assert_eq!(
            meter(Protocol::Anthropic, false, &[standard]).service_tier,
            Some(ServiceTier::Standard)
        );
        for (start, delta) in [(r#","speed":"fast""#, ""), ("", r#","speed":"fast""#)] {
            let stream = format!(
                "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"id\":\"msg_1\",\"model\":\"claude-opus-5-5\",\"usage\":{{\"input_tokens\":10,\"output_tokens\":1{start}}}}}}}\n\nevent: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\"}},\"usage\":{{\"output_tokens\":20{delta}}}}}\n\nevent: message_stop\ndata: {{\"type\":\"message_stop\"}}\n\n"
            );
            for chunks in splits(stream.as_bytes()) {
                let got = meter(Protocol::Anthropic, true, &chunks);
                assert_eq!(got.service_tier, Some(ServiceTier::Fast), "{chunks:?}");
                assert_eq!(got.usage, usage(10, 20, 0, 0, 0, 0));
            }
        }
    }

    /// OpenAI Responses: a stream's searches are its `response.web_search_call.completed`
    /// events, counted by name under any split and kept when the terminal usage arrives; a JSON
    /// answer's are its `web_search_call` output items.
    #[test]
    fn openai_responses_web_searches_are_metered() {
        let mut stream = String::from(concat!(
            "event: response.created\n",
            r#"data: {"type":"response.created","response":{"id":"resp_1","model":"gpt-5","output":[],"usage":null}}"#,
            "\n\n",
        ));
        for n in 0..2 {
            for phase in ["in_progress", "searching", "completed"] {
                stream.push_str(&format!(
                    "event: response.web_search_call.{phase}\ndata: {{\"type\":\"response.web_search_call.{phase}\",\"output_index\":{n},\"item_id\":\"ws_{n}\"}}\n\n"
                ));
            }
        }
        stream.push_str(concat!(
            "event: response.completed\n",
            r#"data: {"type":"response.completed","response":{"id":"resp_1","model":"gpt-5","output":[{"type":"web_search_call","id":"ws_0","status":"completed"},{"type":"web_search_call","id":"ws_1","status":"completed"}],"usage":{"input_tokens":100,"output_tokens":20}}}"#,
            "\n\n",
        ));
        let want = TokenUsage {
            web_search_requests: 2,
            ..usage(100, 20, 0, 0, 0, 0)
        };
        for chunks in splits(stream.as_bytes()) {
            let got = meter(Protocol::OpenaiResponses, true, &chunks);
            assert_eq!(got.usage, want, "{chunks:?}");
            assert!(got.complete);
        }
        // Without `event:` lines the leading `type` names them.
        let bare: String = stream
            .lines()
            .filter(|l| !l.starts_with("event:"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            meter(Protocol::OpenaiResponses, true, &[bare.as_bytes()]).usage,
            want
        );

        let json = r#"{"id":"resp_1","object":"response","model":"gpt-5","output":[{"id":"ws_0","type":"web_search_call","status":"completed","action":{"type":"search","query":"q"}},{"type":"message","id":"msg_1","content":[{"type":"output_text","text":"{\"type\":\"web_search_call\"}","annotations":[]}]},{"type":"web_search_call","id":"ws_1","status":"completed"},{"type":"reasoning","summary":[]}],"usage":{"input_tokens":100,"output_tokens":20}}"#;
        for chunks in splits(json.as_bytes()) {
            assert_eq!(meter(Protocol::OpenaiResponses, false, &chunks).usage, want);
        }
        for (output, calls) in [
            ("[]", 0),
            ("null", 0),
            (r#"[{"type":"web_search_call"}]"#, 1),
            (
                r#"[{"id":"x","type" : "web_search_call"}, {"type":"message"}]"#,
                1,
            ),
            (
                r#"[{"id":"x"},"web_search_call",{"type":"file_search_call"}]"#,
                0,
            ),
        ] {
            let body =
                format!(r#"{{"model":"gpt-5","output":{output},"usage":{{"input_tokens":1}}}}"#);
            let got = meter(Protocol::OpenaiResponses, false, &[body.as_bytes()]);
            assert_eq!(got.usage.web_search_requests, calls, "{output}");
            assert_eq!(got.usage.input_tokens, 1, "{output}");
        }
    }

    #[test]
    fn anthropic_error_event_is_reported_and_not_complete() {
        let cut = &ANTHROPIC_STREAM[..ANTHROPIC_STREAM.len() / 2];
        let mut m = UsageMeter::new(Protocol::Anthropic, true);
        m.feed(cut);
        m.feed(b"\n\nevent: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n");
        let got = m.finish();
        assert_eq!(got.upstream_error.as_deref(), Some("overloaded_error"));
        assert!(!got.complete);
        assert_eq!(got.usage.input_tokens, 12);

        let body = br#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#;
        let got = meter(Protocol::Anthropic, false, &[body]);
        assert_eq!(got.upstream_error.as_deref(), Some("rate_limit_error"));
        assert!(got.usage.is_empty());
    }

    #[test]
    fn openai_chat_stream_without_usage_and_with_errors() {
        let text = "data: {\"id\":\"c1\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n";
        let got = stream_result(Protocol::OpenaiChat, text);
        assert!(got.complete && got.usage.is_empty());
        assert_eq!(got.model.as_deref(), Some("gpt-4o"));
        assert_eq!(got.response_id.as_deref(), Some("c1"));

        let text = "data: {\"id\":\"c1\",\"model\":\"gpt-4o\",\"choices\":[]}\n\ndata: {\"error\":{\"message\":\"boom\",\"type\":\"server_error\",\"code\":null}}\n\n";
        let got = stream_result(Protocol::OpenaiChat, text);
        assert_eq!(got.upstream_error.as_deref(), Some("server_error"));
        assert!(!got.complete);

        let text = "event: error\ndata: not json\n\n";
        assert_eq!(
            stream_result(Protocol::OpenaiChat, text)
                .upstream_error
                .as_deref(),
            Some("error")
        );

        // A compatible upstream that repeats usage on content chunks: last wins, and only the
        // usage-only chunk (or [DONE]) completes the stream.
        let text = "data: {\"id\":\"c2\",\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1}}\n\ndata: {\"id\":\"c2\",\"choices\":[{\"delta\":{\"content\":\"b\"}}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\n";
        let got = stream_result(Protocol::OpenaiChat, text);
        assert_eq!(got.usage, usage(5, 2, 0, 0, 0, 0));
        assert!(!got.complete);
    }

    #[test]
    fn usage_only_chunk_detection() {
        let cases: &[(&str, &[u8], bool)] = &[
            (
                "usage chunk",
                br#"{"id":"c","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
                true,
            ),
            (
                "spaced",
                br#"{"id": "c", "choices": [ ], "usage": {"prompt_tokens": 1}}"#,
                true,
            ),
            (
                "no choices field",
                br#"{"id":"c","usage":{"prompt_tokens":1}}"#,
                true,
            ),
            (
                "content with usage null",
                br#"{"id":"c","choices":[{"delta":{"content":"x"}}],"usage":null}"#,
                false,
            ),
            (
                "content with usage",
                br#"{"id":"c","choices":[{"delta":{"content":"x"}}],"usage":{"prompt_tokens":1}}"#,
                false,
            ),
            ("no usage", br#"{"id":"c","choices":[]}"#, false),
            (
                "escaped usage in text",
                br#"{"choices":[{"delta":{"content":"\"usage\": {}"}}],"usage":null}"#,
                false,
            ),
            (
                "usage key in nested object",
                br#"{"choices":[{"delta":{"usage":{"a":1}}}],"usage":null}"#,
                false,
            ),
            ("not json", br#""usage": {"#, false),
            ("done", b"[DONE]", false),
            ("empty", b"", false),
        ];
        for (name, data, expected) in cases {
            assert_eq!(is_usage_only_chunk(data), *expected, "{name}");
        }
        let usage_chunks = CHAT_STREAM
            .split(|&b| b == b'\n')
            .filter_map(|l| l.strip_prefix(b"data: "))
            .filter(|d| is_usage_only_chunk(d))
            .count();
        assert_eq!(usage_chunks, 1);
    }

    #[test]
    fn openai_responses_terminal_events() {
        let created = r#"event: response.created
data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1","model":"gpt-5","status":"in_progress","usage":null,"error":null}}

"#;
        let usage_json = r#"{"input_tokens":100,"input_tokens_details":{"cached_tokens":60},"output_tokens":30,"output_tokens_details":{"reasoning_tokens":20},"total_tokens":130}"#;
        let cases = [
            (
                "response.incomplete",
                r#""status":"incomplete","incomplete_details":{"reason":"max_output_tokens"},"error":null"#,
                None,
            ),
            (
                "response.failed",
                r#""status":"failed","error":{"code":"server_error","message":"x"}"#,
                Some("server_error"),
            ),
            (
                "response.failed",
                r#""status":"failed","error":null"#,
                Some("response_failed"),
            ),
        ];
        for (event, fields, error) in cases {
            let text = format!(
                "{created}event: {event}\ndata: {{\"type\":\"{event}\",\"response\":{{\"id\":\"resp_1\",\"model\":\"gpt-5\",{fields},\"usage\":{usage_json}}}}}\n\n"
            );
            let got = stream_result(Protocol::OpenaiResponses, &text);
            assert_eq!(got.usage, usage(40, 30, 0, 0, 60, 20), "{event}");
            assert!(got.complete);
            assert_eq!(got.upstream_error.as_deref(), error, "{event} {fields}");
            assert_eq!(got.response_id.as_deref(), Some("resp_1"));
        }

        let text = format!(
            "{created}event: error\ndata: {{\"type\":\"error\",\"code\":\"rate_limit_exceeded\",\"message\":\"slow\",\"param\":null,\"sequence_number\":2}}\n\n"
        );
        let got = stream_result(Protocol::OpenaiResponses, &text);
        assert_eq!(got.upstream_error.as_deref(), Some("rate_limit_exceeded"));
        assert!(!got.complete);

        let body = br#"{"error":{"message":"bad key","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
        let got = meter(Protocol::OpenaiResponses, false, &[body]);
        assert_eq!(got.upstream_error.as_deref(), Some("invalid_request_error"));
        let got = meter(Protocol::OpenaiChat, false, &[body]);
        assert_eq!(got.upstream_error.as_deref(), Some("invalid_request_error"));
    }

    #[test]
    fn gemini_rules() {
        let chunk = |usage: &str, extra: &str| {
            format!("data: {{\"candidates\": [{{\"content\": {{\"parts\": [{{\"text\": \"x\"}}]}}{extra}}}],\"usageMetadata\": {usage},\"modelVersion\": \"gemini-2.5-flash\"}}\r\n\r\n")
        };
        // Tool-use prompt tokens are input; a later chunk without a field keeps the earlier value.
        let text = chunk(
            r#"{"promptTokenCount": 100, "toolUsePromptTokenCount": 7, "thoughtsTokenCount": 50}"#,
            "",
        ) + &chunk(
            r#"{"promptTokenCount": 100, "candidatesTokenCount": 9}"#,
            r#","finishReason": "STOP""#,
        );
        let got = stream_result(Protocol::Gemini, &text);
        assert_eq!(got.usage, usage(107, 59, 0, 0, 0, 50));
        assert!(got.complete);
        assert_eq!(got.response_id, None);

        let blocked = r#"data: {"promptFeedback": {"blockReason": "SAFETY"},"usageMetadata": {"promptTokenCount": 12,"totalTokenCount": 12},"modelVersion": "gemini-2.5-pro"}"#;
        let got = stream_result(Protocol::Gemini, &format!("{blocked}\r\n\r\n"));
        assert!(got.complete);
        assert_eq!(got.usage, usage(12, 0, 0, 0, 0, 0));

        let not_finished = chunk(r#"{"promptTokenCount": 3}"#, "");
        assert!(!stream_result(Protocol::Gemini, &not_finished).complete);

        let error = br#"{"error": {"code": 429, "message": "Resource has been exhausted", "status": "RESOURCE_EXHAUSTED"}}"#;
        let got = meter(Protocol::Gemini, false, &[error]);
        assert_eq!(got.upstream_error.as_deref(), Some("RESOURCE_EXHAUSTED"));
        let got = stream_result(
            Protocol::Gemini,
            &format!("data: {}\r\n\r\n", std::str::from_utf8(error).unwrap()),
        );
        assert_eq!(got.upstream_error.as_deref(), Some("RESOURCE_EXHAUSTED"));

        let array = br#"[{"usageMetadata": {"promptTokenCount": 5}}, {"error": {"code": 503, "status": "UNAVAILABLE"}}]"#;
        let got = meter(Protocol::Gemini, false, &[array]);
        assert_eq!(got.upstream_error.as_deref(), Some("UNAVAILABLE"));
        assert_eq!(got.usage.input_tokens, 5);

        // Grounding with Google Search: each distinct query the answer lists counts once, an
        // empty one not at all (as Gemini bills them); a chunk repeating the list adds none.
        let grounding = r#","groundingMetadata": {"webSearchQueries": ["weather", "", "news", "weather"], "groundingChunks": [{"web": {"uri": "https://example.com"}}]}"#;
        let text = chunk(r#"{"promptTokenCount": 10}"#, "")
            + &chunk(
                r#"{"promptTokenCount": 10, "candidatesTokenCount": 4}"#,
                &format!("{grounding},\"finishReason\": \"STOP\""),
            )
            + &chunk(
                r#"{"promptTokenCount": 10, "candidatesTokenCount": 4}"#,
                grounding,
            );
        let got = stream_result(Protocol::Gemini, &text);
        assert_eq!(got.usage.web_search_requests, 2, "{got:?}");
        assert_eq!((got.usage.input_tokens, got.usage.output_tokens), (10, 4));
        // A grounding chunk with no usage of its own still counts; so does a whole answer.
        let text = chunk(r#"{"promptTokenCount": 10}"#, "")
            + &format!(
                "data: {{\"candidates\": [{{\"finishReason\": \"STOP\"{grounding}}}]}}\r\n\r\n"
            );
        let got = stream_result(Protocol::Gemini, &text);
        assert_eq!(
            (got.usage.web_search_requests, got.usage.input_tokens),
            (2, 10)
        );
        let body = format!(
            "{{\"candidates\": [{{\"content\": {{\"parts\": [{{\"text\": \"x\"}}]}}{grounding}}}], \"usageMetadata\": {{\"promptTokenCount\": 3}}}}"
        );
        let got = meter(Protocol::Gemini, false, &[body.as_bytes()]);
        assert_eq!(got.usage.web_search_requests, 2, "{got:?}");
        let array = format!("[{body}]");
        let got = meter(Protocol::Gemini, false, &[array.as_bytes()]);
        assert_eq!(got.usage.web_search_requests, 2, "{got:?}");
        // Grounding of another shape: the answer's tokens are still counted.
        let odd = br#"{"candidates": [{"groundingMetadata": {"webSearchQueries": "q"}}], "usageMetadata": {"promptTokenCount": 3}}"#;
        let got = meter(Protocol::Gemini, false, &[odd]);
        assert_eq!(
            (got.usage.input_tokens, got.usage.web_search_requests),
            (3, 0)
        );
        // An answer listing more queries than any runs is counted up to the cap.
        let many: Vec<String> = (0..1_000).map(|n| format!("q{n}")).collect();
        let body = serde_json::json!({"candidates": [{"groundingMetadata": {"webSearchQueries": many}}], "usageMetadata": {"promptTokenCount": 3}}).to_string();
        let got = meter(Protocol::Gemini, false, &[body.as_bytes()]);
        assert_eq!(got.usage.web_search_requests, MAX_SEARCH_QUERIES as u64);
        // Lists split over chunks count together, each query once, however its text is
        // escaped: weather, news (twice: plain and as \u escapes), maps.
        let listing = |queries: &str| {
            format!(
                "data: {{\"candidates\": [{{\"groundingMetadata\": {{\"webSearchQueries\": {queries}}}}}], \"usageMetadata\": {{\"promptTokenCount\": 10}}}}\r\n\r\n"
            )
        };
        let text = listing(r#"["weather", "news"]"#)
            + &listing(r#"["\u006eews", "maps", ""]"#)
            + &listing(r#"["weather"]"#);
        let got = stream_result(Protocol::Gemini, &text);
        assert_eq!(got.usage.web_search_requests, 3, "{got:?}");
    }

    /// A stream cut before it named its tier is billed at the tier it asked for; one that ended
    /// as its protocol ends it without naming one (an upstream that reports no usage) is not.
    #[test]
    fn only_a_cut_answer_takes_the_tier_it_asked_for() {
        use crate::chain::ResponseFilter;
        let route = crate::route::ApiRoute {
            protocol: Protocol::OpenaiChat,
            upstream_path: "/v1/chat/completions".into(),
            path_model: None,
            path_stream: false,
            billed: true,
        };
        let chunk = r#"data: {"id":"c1","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"content":"hi"}}]}"#;
        for (stream, tier) in [
            (
                format!("{chunk}\n\n"),
                Some(crate::cost::ServiceTier::Priority),
            ),
            (format!("{chunk}\n\ndata: [DONE]\n\n"), None),
        ] {
            let mut ctx = crate::context::RequestCtx::new("r".into(), route.clone(), 0);
            ctx.request.service_tier = crate::cost::ServiceTier::Priority;
            ctx.request.body_len = 400;
            let mut meter = UsageMeter::new(Protocol::OpenaiChat, true);
            meter.feed(stream.as_bytes());
            ctx.usage.meter = Some(meter);
            SseUsage.on_end(&mut ctx);
            assert!(ctx.usage.estimated, "{stream}");
            assert_eq!(ctx.usage.service_tier, tier, "{stream}");
        }
    }

    #[test]
    fn a_meter_past_its_cap_flags_the_record_estimated() {
        use crate::chain::ResponseFilter;
        let route = crate::route::ApiRoute {
            protocol: Protocol::Anthropic,
            upstream_path: "/v1/messages".into(),
            path_model: None,
            path_stream: false,
            billed: true,
        };
        let mut ctx = crate::context::RequestCtx::new("r".into(), route, 0);
        let mut meter = UsageMeter::with_limit(Protocol::Anthropic, false, 100);
        meter.feed(ANTHROPIC_JSON);
        ctx.usage.meter = Some(meter);
        SseUsage.on_end(&mut ctx);
        assert!(ctx.usage.estimated);

        let mut meter = UsageMeter::new(Protocol::Anthropic, false);
        meter.feed(ANTHROPIC_JSON);
        ctx.usage.meter = Some(meter);
        ctx.usage.estimated = false;
        SseUsage.on_end(&mut ctx);
        assert!(!ctx.usage.estimated);
        assert!(ctx.usage.tokens.input_tokens > 0);

        // Counts no request can have are capped, and flagged.
        let mut meter = UsageMeter::new(Protocol::Anthropic, false);
        meter.feed(
            br#"{"model":"m","usage":{"input_tokens":18446744073709551615,"output_tokens":7}}"#,
        );
        ctx.usage.meter = Some(meter);
        SseUsage.on_end(&mut ctx);
        assert!(ctx.usage.estimated);
        assert_eq!(ctx.usage.tokens.input_tokens, crate::MAX_TOKENS);
        assert_eq!(ctx.usage.tokens.output_tokens, 7);
    }

    #[test]
    fn unfinished_or_usage_less_billed_answers_are_flagged_and_in_band_errors_kept() {
        use crate::chain::ResponseFilter;
        let ctx_for = |billed: bool| {
            let route = crate::route::ApiRoute {
                protocol: Protocol::Anthropic,
                upstream_path: "/v1/messages".into(),
                path_model: None,
                path_stream: false,
                billed,
            };
            crate::context::RequestCtx::new("r".into(), route, 0)
        };
        let settle = |ctx: &mut crate::context::RequestCtx, stream: bool, body: &[u8]| {
            let mut meter = UsageMeter::new(Protocol::Anthropic, stream);
            meter.feed(body);
            ctx.usage.meter = Some(meter);
            SseUsage.on_end(ctx);
        };
        let start = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"claude-x\",\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\n";
        let error = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";

        // A whole stream: neither.
        let mut ctx = ctx_for(true);
        settle(&mut ctx, true, ANTHROPIC_STREAM);
        assert!(!ctx.usage.estimated && ctx.usage.upstream_error.is_none());

        // Started, then an error event, then a clean end.
        let mut ctx = ctx_for(true);
        settle(&mut ctx, true, format!("{start}{error}").as_bytes());
        assert!(ctx.usage.estimated);
        assert_eq!(
            ctx.usage.upstream_error.as_deref(),
            Some("overloaded_error")
        );
        assert_eq!(ctx.usage.tokens.input_tokens, 12);

        // Started, then a clean end without message_stop.
        let mut ctx = ctx_for(true);
        settle(&mut ctx, true, start.as_bytes());
        assert!(ctx.usage.estimated && ctx.usage.upstream_error.is_none());

        // A whole JSON answer without usage.
        let mut ctx = ctx_for(true);
        settle(
            &mut ctx,
            false,
            br#"{"id":"msg_1","model":"claude-x","content":[]}"#,
        );
        assert!(ctx.usage.estimated);

        // An unbilled call (count_tokens) answers without usage by design.
        let mut ctx = ctx_for(false);
        settle(&mut ctx, false, br#"{"input_tokens":12}"#);
        assert!(!ctx.usage.estimated);
    }

    /// `streamGenerateContent` without `alt=sse`: every prefix of the array books what the
    /// `alt=sse` form of its complete elements books, however the prefix is split.
    #[test]
    fn a_gemini_array_is_metered_element_by_element_under_any_split() {
        let elements: Vec<&[u8]> = GEMINI_STREAM
            .split(|&b| b == b'\n')
            .filter_map(|line| line.strip_prefix(b"data: "))
            .map(<[u8]>::trim_ascii_end)
            .collect();
        assert_eq!(elements.len(), 3);
        let mut array = b" [".to_vec();
        let mut ends = Vec::new();
        for (k, element) in elements.iter().enumerate() {
            if k > 0 {
                array.extend_from_slice(b"\n,\r\n");
            }
            array.extend_from_slice(element);
            ends.push(array.len());
        }
        array.extend_from_slice(b"\n]\n");
        let sse_of = |k: usize| {
            let text: String = elements[..k]
                .iter()
                .map(|e| format!("data: {}\r\n\r\n", std::str::from_utf8(e).unwrap()))
                .collect();
            stream_result(Protocol::Gemini, &text)
        };
        let whole = sse_of(elements.len());
        assert!(whole.complete && whole.usage.output_tokens > 0);
        for chunks in splits(&array) {
            assert_eq!(meter(Protocol::Gemini, false, &chunks), whole);
        }
        for cut in 0..array.len() {
            let prefix = &array[..cut];
            let want = sse_of(ends.iter().filter(|&&end| end <= cut).count());
            assert_eq!(meter(Protocol::Gemini, false, &[prefix]), want, "cut {cut}");
            let bytes: Vec<&[u8]> = prefix.chunks(1).collect();
            assert_eq!(meter(Protocol::Gemini, false, &bytes), want, "cut {cut}");
        }
        // Cut after the first element: its counts, not complete (the record is flagged).
        let first = meter(Protocol::Gemini, false, &[&array[..ends[0] + 1]]);
        assert!(first.usage.input_tokens > 0 && !first.complete);
    }

    /// An element larger than the cap is dropped (and the record flagged) only when it had to
    /// be kept across chunks; the elements after it are still read.
    #[test]
    fn a_gemini_array_element_past_the_cap_is_skipped_not_the_rest() {
        let text = "x".repeat(1000);
        let array = format!(
            r#"[{{"usageMetadata":{{"promptTokenCount":5}}}},{{"candidates":[{{"content":{{"parts":[{{"text":"{text}"}}]}}}}],"usageMetadata":{{"promptTokenCount":5,"candidatesTokenCount":9}}}},{{"usageMetadata":{{"promptTokenCount":5,"candidatesTokenCount":12}}}}]"#
        );
        let mut m = UsageMeter::with_limit(Protocol::Gemini, false, 200);
        m.feed(array.as_bytes());
        assert!(!m.gave_up(), "one chunk is read in place");
        assert_eq!(m.finish().usage, usage(5, 12, 0, 0, 0, 0));
        let mut m = UsageMeter::with_limit(Protocol::Gemini, false, 200);
        for b in array.as_bytes().chunks(1) {
            m.feed(b);
        }
        assert!(m.gave_up());
        let got = m.finish();
        assert_eq!(got.usage, usage(5, 12, 0, 0, 0, 0));
        assert!(got.complete);
        // Not an array of objects: what came before is kept.
        let got = meter(
            Protocol::Gemini,
            false,
            &[br#"[{"usageMetadata":{"promptTokenCount":5}}, 7, {"usageMetadata":{"promptTokenCount":9}}]"#],
        );
        assert_eq!(got.usage.input_tokens, 5);
        assert!(!got.complete);
    }

    #[test]
    fn text_delta_events_are_counted() {
        let anthropic = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"x\",\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\nevent: ping\ndata: {\"type\":\"ping\"}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" there\"}}\n\n";
        let responses = b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"a\"}\n\nevent: response.output_audio.delta\ndata: {\"type\":\"response.output_audio.delta\",\"delta\":\"AAAA\"}\n\nevent: response.function_call_arguments.delta\ndata: {\"type\":\"response.function_call_arguments.delta\",\"delta\":\"{\"}\n\nevent: response.output_text.done\ndata: {\"type\":\"response.output_text.done\"}\n\n";
        for (protocol, stream, deltas) in [
            (Protocol::Anthropic, &anthropic[..], 2),
            (Protocol::OpenaiResponses, &responses[..], 2),
        ] {
            for chunks in splits(stream) {
                let mut m = UsageMeter::new(protocol, true);
                for c in &chunks {
                    m.feed(c);
                }
                assert_eq!(m.text_deltas(), deltas, "{protocol:?}");
            }
        }
        assert!(is_text_delta("response.output_text.delta"));
        assert!(is_text_delta("response.function_call_arguments.delta"));
        assert!(is_text_delta("response.output_audio_transcript.delta"));
        assert!(!is_text_delta("response.output_audio.delta"));
        assert!(!is_text_delta("response.output_text.done"));
    }

    /// OpenAI reports usage only in a stream's last event: one cut before it books the
    /// request's estimated input and the text seen as output, flagged; Anthropic's exact input
    /// is kept.
    #[test]
    fn a_billed_stream_cut_before_its_usage_books_an_estimate() {
        use crate::chain::ResponseFilter;
        // A billed request of a 4 000-byte body whose answer was `body`, ended.
        let end = |protocol: Protocol, body: &[u8]| {
            let route = crate::route::ApiRoute {
                protocol,
                upstream_path: "/v1/x".into(),
                path_model: None,
                path_stream: false,
                billed: true,
            };
            let mut ctx = crate::context::RequestCtx::new("r".into(), route, 0);
            ctx.request.body_len = 4000;
            let mut meter = UsageMeter::new(protocol, true);
            meter.feed(body);
            ctx.usage.meter = Some(meter);
            SseUsage.on_end(&mut ctx);
            ctx.usage
        };
        let settle = |protocol: Protocol, body: &[u8]| {
            let usage = end(protocol, body);
            assert!(usage.estimated);
            usage.tokens
        };
        let before = |stream: &'static [u8], last: &str| {
            let at = memchr::memmem::find(stream, last.as_bytes()).unwrap();
            &stream[..at]
        };

        let responses = before(RESPONSES_STREAM, "event: response.completed");
        let tokens = settle(Protocol::OpenaiResponses, responses);
        assert_eq!(tokens.input_tokens, 1000);
        assert!(tokens.output_tokens > 0, "{tokens:?}");
        let chat = before(CHAT_STREAM, "data: [DONE]");
        let usage_chunk = memchr::memmem::rfind(chat, b"data: {").unwrap();
        let tokens = settle(Protocol::OpenaiChat, &chat[..usage_chunk]);
        assert_eq!(tokens.input_tokens, 1000);
        assert!(tokens.output_tokens > 0, "{tokens:?}");

        // Gemini 3 reports its usage in the last chunk only: a stream cut before it books
        // the estimated input and a token a chunk seen, in SSE or as a JSON array.
        let chunk = r#"{"candidates":[{"content":{"parts":[{"text":"Voici"}],"role":"model"},"index":0}],"modelVersion":"gemini-3-pro-preview"}"#;
        let sse = format!("data: {chunk}\r\n\r\ndata: {chunk}\r\n\r\n");
        let tokens = settle(Protocol::Gemini, sse.as_bytes());
        assert_eq!((tokens.input_tokens, tokens.output_tokens), (1000, 2));
        let array = format!("[{chunk},\n{chunk},\n{chunk}");
        for chunks in splits(array.as_bytes()) {
            let mut m = UsageMeter::new(Protocol::Gemini, false);
            for c in &chunks {
                m.feed(c);
            }
            // The third element is not known to be whole until what follows it.
            assert!(m.text_deltas() >= 2, "{chunks:?}");
            assert!(!m.snapshot().complete);
        }
        let error = r#"data: {"error":{"code":500,"message":"x","status":"INTERNAL"}}"#;
        let tokens = settle(Protocol::Gemini, format!("{error}\n\n").as_bytes());
        assert_eq!(tokens, TokenUsage::default(), "an error before any chunk");

        // A Chat stream that ended at [DONE] without a usage chunk (an upstream ignoring
        // include_usage): estimated alike.
        let no_usage = b"data: {\"id\":\"c\",\"model\":\"gpt-4o\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"id\":\"c\",\"model\":\"gpt-4o\",\"choices\":[{\"delta\":{\"content\":\" there\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";
        let tokens = settle(Protocol::OpenaiChat, no_usage);
        assert_eq!((tokens.input_tokens, tokens.output_tokens), (1000, 2));

        // A Chat upstream's error, then [DONE] or not: nothing generated, nothing billed.
        let chat_error = b"data: {\"error\":{\"message\":\"x\",\"type\":\"server_error\"}}\n\n";
        for body in [
            &chat_error[..],
            &[&chat_error[..], b"data: [DONE]\n\n"].concat(),
        ] {
            let usage = end(Protocol::OpenaiChat, body);
            assert_eq!(
                usage.tokens,
                TokenUsage::default(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }

        // Nothing but the request: input only.
        let tokens = settle(Protocol::OpenaiChat, b"");
        assert_eq!((tokens.input_tokens, tokens.output_tokens), (1000, 0));

        // Anthropic: message_start's input is exact; output at least the text seen.
        let anthropic = before(ANTHROPIC_STREAM, "event: message_delta");
        let tokens = settle(Protocol::Anthropic, anthropic);
        assert_eq!(tokens.input_tokens, 12);
        assert_eq!(tokens.cache_read_tokens, 20480);
        assert!(tokens.output_tokens > 1, "{tokens:?}");

        // Whole streams keep the upstream's counts.
        for (protocol, stream) in [
            (Protocol::OpenaiResponses, RESPONSES_STREAM),
            (Protocol::OpenaiChat, CHAT_STREAM),
        ] {
            let mut meter = UsageMeter::new(protocol, true);
            meter.feed(stream);
            let want = meter.snapshot().usage;
            let usage = end(protocol, stream);
            assert!(!usage.estimated);
            assert_eq!(usage.tokens, want);
        }

        // Answers that ended as their protocol ends one, without usage, are billed as reported:
        // a failed response whose usage is null, a complete answer counting nothing.
        let failed = b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"model\":\"gpt-5\"}}\n\nevent: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{\"id\":\"resp_1\",\"status\":\"failed\",\"error\":{\"code\":\"server_error\",\"message\":\"x\"},\"usage\":null}}\n\n";
        let zero = b"data: {\"id\":\"c\",\"model\":\"gpt-4o\",\"choices\":[{\"delta\":{\"content\":\"\"}}]}\n\ndata: {\"id\":\"c\",\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":0,\"completion_tokens\":0}}\n\ndata: [DONE]\n\n";
        // A cut that came as an error event before any text: nothing was generated.
        let error_first = b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"server_error\",\"message\":\"x\"}}\n\n";
        for (protocol, body) in [
            (Protocol::OpenaiResponses, &failed[..]),
            (Protocol::OpenaiChat, &zero[..]),
            (Protocol::OpenaiResponses, &error_first[..]),
        ] {
            let tokens = settle(protocol, body);
            assert_eq!(tokens, TokenUsage::default(), "{protocol:?}");
        }
    }

    /// Cumulative counts never go down: a compatible server's message_delta with
    /// `"input_tokens":0` keeps message_start's input, and a Gemini chunk with smaller counts
    /// keeps the larger ones.
    #[test]
    fn cumulative_counts_are_never_lowered() {
        let text = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"m\",\"usage\":{\"input_tokens\":500,\"output_tokens\":1}}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"input_tokens\":0,\"output_tokens\":20}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        for chunks in splits(text.as_bytes()) {
            let got = meter(Protocol::Anthropic, true, &chunks);
            assert_eq!(got.usage, usage(500, 20, 0, 0, 0, 0));
        }
        let text = concat!(
            "data: {\"usageMetadata\":{\"promptTokenCount\":100,\"candidatesTokenCount\":30,\"thoughtsTokenCount\":8}}\r\n\r\n",
            "data: {\"usageMetadata\":{\"promptTokenCount\":0,\"candidatesTokenCount\":12,\"thoughtsTokenCount\":0}}\r\n\r\n",
        );
        let got = stream_result(Protocol::Gemini, text);
        assert_eq!(got.usage, usage(100, 38, 0, 0, 0, 8));
    }

    /// A terminal event past the cap (a Responses answer repeating a huge base64 image, a
    /// Gemini chunk with inline data) is dropped, but its usage is read from its last bytes.
    #[test]
    fn a_dropped_event_still_gives_the_usage_at_its_end() {
        let image = "QUJD".repeat(40 << 10);
        let responses = String::from_utf8(RESPONSES_STREAM.to_vec()).unwrap();
        let at = responses.find("event: response.completed").unwrap();
        let (head, completed) = responses.split_at(at);
        assert!(completed.contains(r#""output":["#));
        let completed = completed.replacen(
            r#""output":["#,
            &format!(
                r#""output":[{{"type":"image_generation_call","id":"ig_1","status":"completed","result":"{image}"}},"#
            ),
            1,
        );
        // Served at priority: the tier follows the output, in the kept tail.
        assert!(completed.contains(r#""service_tier":"default""#));
        let completed = completed.replacen(
            r#""service_tier":"default""#,
            r#""service_tier":"priority""#,
            1,
        );
        let stream = format!("{head}{completed}");
        let want = usage(366, 412, 0, 0, 4864, 256);
        for size in [1, 7, 4096, 64 << 10] {
            let mut m = UsageMeter::with_limit(Protocol::OpenaiResponses, true, 64 << 10);
            for chunk in stream.as_bytes().chunks(size) {
                m.feed(chunk);
            }
            let got = m.finish();
            assert!(m.gave_up(), "{size}");
            assert_eq!(got.usage, want, "{size}");
            assert!(got.complete, "{size}");
            assert_eq!(got.service_tier, Some(ServiceTier::Priority), "{size}");
        }

        let gemini = format!(
            "data: {{\"candidates\":[{{\"content\":{{\"parts\":[{{\"inlineData\":{{\"mimeType\":\"image/png\",\"data\":\"{image}\"}}}}]}},\"finishReason\":\"STOP\"}}],\"usageMetadata\":{{\"promptTokenCount\":40,\"candidatesTokenCount\":1290,\"totalTokenCount\":1330}},\"modelVersion\":\"gemini-2.5-flash-image\",\"responseId\":\"r\"}}\r\n\r\n"
        );
        let mut m = UsageMeter::with_limit(Protocol::Gemini, true, 64 << 10);
        for chunk in gemini.as_bytes().chunks(4096) {
            m.feed(chunk);
        }
        let got = m.finish();
        assert!(m.gave_up());
        assert_eq!(got.usage, usage(40, 1290, 0, 0, 0, 0));

        // A dropped content event is no usage event.
        let mut m = UsageMeter::with_limit(Protocol::OpenaiResponses, true, 1024);
        m.feed(
            format!("event: response.output_text.delta\ndata: {{\"delta\":\"{image}\",\"usage\":{{\"input_tokens\":9}}}}\n\n")
                .as_bytes()
                .chunks(512)
                .next()
                .unwrap(),
        );
        assert!(m.finish().usage.is_empty());
    }

    #[test]
    fn a_json_meter_given_an_event_stream_meters_it_as_one() {
        for (protocol, stream) in [
            (Protocol::Anthropic, ANTHROPIC_STREAM),
            (Protocol::OpenaiChat, CHAT_STREAM),
            (Protocol::OpenaiResponses, RESPONSES_STREAM),
            (Protocol::Gemini, GEMINI_STREAM),
        ] {
            let want = stream_result(protocol, std::str::from_utf8(stream).unwrap());
            assert!(want.complete && !want.usage.is_empty(), "{protocol:?}");
            // Any split, also one that leaves only blank space or one byte in the first chunk.
            for first in [0, 1, 2, 7, stream.len() / 2] {
                let mut m = UsageMeter::new(protocol, false);
                m.feed(b"\r\n");
                m.feed(&stream[..first]);
                m.feed(&stream[first..]);
                assert_eq!(m.finish(), want, "{protocol:?} split at {first}");
            }
        }
        // JSON stays JSON, after blank space too.
        let mut m = UsageMeter::new(Protocol::Anthropic, false);
        m.feed(b"  \n");
        m.feed(ANTHROPIC_JSON);
        assert!(m.finish().complete);
        assert!(matches!(m, UsageMeter::AnthropicJson(_)));
    }

    #[test]
    fn an_empty_id_or_model_names_nothing() {
        let text = "data: {\"id\":\"\",\"object\":\"\",\"created\":0,\"model\":\"\",\"choices\":[],\"prompt_filter_results\":[]}\n\n\
            data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-2024-08-06\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n\
            data: {\"id\":\"chatcmpl-1\",\"model\":\"gpt-4o-2024-08-06\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n\
            data: [DONE]\n\n";
        let got = stream_result(Protocol::OpenaiChat, text);
        assert_eq!(got.model.as_deref(), Some("gpt-4o-2024-08-06"));
        assert_eq!(got.response_id.as_deref(), Some("chatcmpl-1"));
        assert_eq!(got.usage.input_tokens, 5);
    }

    #[test]
    fn json_meter_gives_up_past_its_cap() {
        let mut m = UsageMeter::with_limit(Protocol::Anthropic, false, 100);
        for chunk in ANTHROPIC_JSON.chunks(50) {
            m.feed(chunk);
        }
        assert!(m.gave_up());
        assert_eq!(m.finish(), MeterResult::default());

        let mut m = UsageMeter::with_limit(Protocol::Anthropic, false, ANTHROPIC_JSON.len());
        m.feed(ANTHROPIC_JSON);
        assert!(!m.gave_up());
        assert_eq!(m.finish().usage.input_tokens, 2095);
    }

    #[test]
    fn stream_meter_over_its_cap_reports_giving_up() {
        let mut m = UsageMeter::with_limit(Protocol::Anthropic, true, 64);
        for chunk in ANTHROPIC_STREAM.chunks(10) {
            m.feed(chunk);
        }
        let got = m.finish();
        assert!(m.gave_up());
        // message_start and message_delta are longer than 64 bytes: no usage, but no panic.
        assert!(got.usage.is_empty());
        assert!(got.complete);
    }

    #[test]
    fn hostile_bodies_never_panic() {
        let nasty: &[&[u8]] = &[
            b"",
            b"\xff\xfe\x00garbage",
            b"data: {\"usage\": {\"prompt_tokens\": -1}}\n\n",
            b"data: {\"usage\": {\"prompt_tokens\": 1e30, \"completion_tokens\": 18446744073709551615}}\n\n",
            b"data: {\"usageMetadata\": {\"promptTokenCount\": 18446744073709551615, \"toolUsePromptTokenCount\": 18446744073709551615, \"candidatesTokenCount\": 18446744073709551615, \"thoughtsTokenCount\": 5}}\n\n",
            b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"cache_creation_input_tokens\":5,\"cache_creation\":{\"ephemeral_5m_input_tokens\":18446744073709551615,\"ephemeral_1h_input_tokens\":18446744073709551615}}}}\n\n",
            b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"\\ud800\",\"id\":[1,2]}}\n\n",
            b"event: error\ndata: {\"error\": 5}\n\n",
            b"event: response.completed\ndata: {\"response\": \"nope\"}\n\n",
            b"data: [{\"usageMetadata\": []}]\n\n",
            b"[",
            b"{\"usage\":{\"prompt_tokens\":3,\"prompt_tokens_details\":{\"cached_tokens\":9}}}",
        ];
        // A cheap deterministic generator: no randomness source needed.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let alphabet = b"data: {}\"usage\r\n:[]0123456789,event";
        let mut noise = Vec::new();
        for _ in 0..4096 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            noise.push(alphabet[(state % alphabet.len() as u64) as usize]);
        }
        for protocol in [
            Protocol::Anthropic,
            Protocol::OpenaiChat,
            Protocol::OpenaiResponses,
            Protocol::Gemini,
        ] {
            for stream in [true, false] {
                for input in nasty.iter().copied().chain([&noise[..]]) {
                    for chunks in [vec![input], input.chunks(3).collect()] {
                        let result = meter(protocol, stream, &chunks);
                        assert!(result
                            .model
                            .as_ref()
                            .is_none_or(|m| m.len() <= MAX_KEPT_STRING));
                    }
                }
            }
        }
        let got = meter(Protocol::OpenaiChat, false, &[nasty[11]]);
        assert_eq!(got.usage, usage(0, 0, 0, 0, 9, 0));
    }

    #[test]
    fn kept_strings_are_bounded_at_a_char_boundary() {
        let long = "é".repeat(300);
        let body =
            format!("{{\"id\":\"{long}\",\"model\":\"{long}\",\"usage\":{{\"prompt_tokens\":1}}}}");
        let got = meter(Protocol::OpenaiChat, false, &[body.as_bytes()]);
        let id = got.response_id.unwrap();
        assert!(id.len() <= MAX_KEPT_STRING && id.chars().all(|c| c == 'é'));
    }

    #[test]
    fn leading_type_reads_only_a_leading_type_field() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (br#"{"type":"message_stop"}"#, Some("message_stop")),
            (br#" { "type" : "ping" }"#, Some("ping")),
            (br#"{"index":0,"type":"x"}"#, None),
            (br#"{"type":"a\"b"}"#, None),
            (br#"{"type":1}"#, None),
            (b"", None),
        ];
        for (data, expected) in cases {
            assert_eq!(leading_type(data), *expected);
        }
    }

    #[test]
    fn usage_chunk_is_stripped_at_any_split() {
        let stream: &[u8] = b"data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n\
data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\n\
data: [DONE]\n\n";
        let want: &[u8] = b"data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\ndata: [DONE]\n\n";
        for cut in 0..=stream.len() {
            let mut s = UsageChunkStripper::default();
            let mut out = s.push(&stream[..cut]);
            out.extend(s.push(&stream[cut..]));
            out.extend(s.finish());
            assert_eq!(out, want, "split at {cut}");
        }
        let mut s = UsageChunkStripper::default();
        let mut out = Vec::new();
        for b in stream {
            out.extend(s.push(std::slice::from_ref(b)));
        }
        out.extend(s.finish());
        assert_eq!(out, want);
    }

    /// The scanner reads what serde reads, or leaves the chunk to serde.
    #[test]
    fn gemini_scanner_agrees_with_serde() {
        let mut chunks: Vec<Vec<u8>> = GEMINI_STREAM
            .split(|&b| b == b'\n')
            .filter_map(|line| line.strip_prefix(b"data: "))
            .map(<[u8]>::to_vec)
            .collect();
        chunks.push(GEMINI_JSON.to_vec());
        let array: Vec<serde_json::Value> = serde_json::from_slice(GEMINI_ARRAY_JSON).unwrap();
        chunks.extend(array.iter().map(|v| serde_json::to_vec(v).unwrap()));
        assert!(chunks.len() >= 5);
        let crafted: &[&str] = &[
            r#"{"candidates":[{"content":{"parts":[{"text":"\"usageMetadata\": {\"promptTokenCount\": 9}"}]}}],"usageMetadata":{"promptTokenCount":5}}"#,
            r#"{"candidates":[{"finishReason":null},{"finishReason":"MAX_TOKENS"}]}"#,
            r#"{"candidates":null,"usageMetadata":null,"modelVersion":null,"responseId":"r"}"#,
            r#"{"promptFeedback":{"blockReason":"SAFETY"},"usageMetadata":{"promptTokenCount":7,"totalTokenCount":7}}"#,
            r#"{"promptFeedback":{"blockReason":null}}"#,
            r#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","message":"quota"}}"#,
            r#"{"error":null,"usageMetadata":{"thoughtsTokenCount":3,"toolUsePromptTokenCount":4}}"#,
            r#"{ "usageMetadata" : { "candidatesTokenCount" : 12 } , "modelVersion" : "m\u00e9" }"#,
            r#"{"usageMetadata":{"promptTokenCount":5},"candidates":[{"content":{"parts":[{"functionCall":{"name":"f","args":{"usageMetadata":{"promptTokenCount":99}}}}]}}],"modelVersion":"m","responseId":"r"}"#,
            r#"{"candidates":[{"content":{"parts":[{"text":"a"}]}}],"usageMetadata":{"promptTokenCount":6},"modelVersion":"m","responseId":"r","x":"\"usageMetadata\":{}"}"#,
            r#"{"modelVersion":"m","responseId":"r","usageMetadata":{"promptTokenCount":8}}"#,
            // Grounded: distinct non-empty queries, over every candidate.
            r#"{"candidates":[{"content":{"parts":[{"text":"a"}]},"groundingMetadata":{"webSearchQueries":["q1","","q2","q1"],"groundingChunks":[]}}],"usageMetadata":{"promptTokenCount":6},"modelVersion":"m","responseId":"r"}"#,
            r#"{"candidates":[{"groundingMetadata":{"webSearchQueries":[""]}},{"groundingMetadata":{"webSearchQueries":["q3","q\u0031"]}},{"groundingMetadata":null}]}"#,
            r#"{"candidates":[{"groundingMetadata":{"webSearchQueries":null,"searchEntryPoint":{}}}]}"#,
            r#"{"candidates":[{"groundingMetadata":{"webSearchQueries":[]}}],"usageMetadata":{"promptTokenCount":1}}"#,
            // Grounding of another shape costs its searches only, never the chunk's tokens.
            r#"{"candidates":[{"groundingMetadata":"x"},{"groundingMetadata":{"webSearchQueries":{"q":1}}}],"usageMetadata":{"promptTokenCount":2}}"#,
            // Left to serde: an escaped key, a count written as a float, a string count.
            r#"{"usage\u004detadata":{"promptTokenCount":5}}"#,
            r#"{"usageMetadata":{"promptTokenCount":5.0}}"#,
            r#"{"usageMetadata":{"promptTokenCount":"5"}}"#,
            // Malformed for both.
            r#"{"usageMetadata":{"promptTokenCount":5}"#,
            r#"{"candidates":[null]}"#,
            r#"[]"#,
        ];
        chunks.extend(crafted.iter().map(|c| c.as_bytes().to_vec()));
        let (mut scanned, mut tail) = (0, 0);
        for data in &chunks {
            let by_serde = serde_json::from_slice::<GeminiChunkWire<'_>>(data)
                .ok()
                .map(GeminiChunk::from);
            if let Some(chunk) = scan_gemini_chunk(data) {
                scanned += 1;
                assert_eq!(Some(chunk), by_serde, "{}", String::from_utf8_lossy(data));
            }
            if let Some(chunk) = scan_gemini_tail(data, &MeterResult::default()) {
                tail += 1;
                assert_eq!(Some(chunk), by_serde, "{}", String::from_utf8_lossy(data));
            }
        }
        assert!(scanned >= chunks.len() - 6, "{scanned} of {}", chunks.len());
        // The stream's chunks before the last are read from their tail, and the crafted one
        // in the usual order; ids before usageMetadata send a chunk to the full scan.
        assert!(tail >= 3, "{tail}");
        // The text mentioning usageMetadata is not read as counts.
        let first = scan_gemini_chunk(crafted[0].as_bytes()).unwrap();
        assert_eq!(first.usage.unwrap().prompt_token_count, Some(5));
        let nested_last = scan_gemini_chunk(crafted[8].as_bytes()).unwrap();
        assert_eq!(nested_last.usage.unwrap().prompt_token_count, Some(5));
        for left in &crafted[16..] {
            assert!(scan_gemini_chunk(left.as_bytes()).is_none(), "{left}");
        }
    }
}
