//! The few request-body fields routing needs, parsed in one borrowing pass, plus byte-exact
//! edits of top-level fields (`model`, `stream_options`) that keep every other byte as it is.
//!
//! Bodies are large (Claude Code sends ~80 KiB per turn, Codex 200 KiB and more) and are
//! forwarded as they came: big fields (`messages`, `tools`, `input`) are kept as `&RawValue`
//! slices of the client's bytes, never copied or parsed into values here.

use std::borrow::Cow;
use std::ops::Range;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::cost::ServiceTier;
use crate::Protocol;

/// The fields of a request body the relay reads, borrowed from the client's bytes.
///
/// String fields are `Cow` because a JSON string with escapes (`\n`, `\"`) cannot be borrowed
/// as `&str`; they stay `Cow::Borrowed` (no copy) when the string has none. Use `.as_deref()`
/// to get an `Option<&str>`.
#[derive(Debug, Default)]
pub struct RequestBody<'a> {
    /// Body `model` (Gemini has none in the body: the caller takes the model from the path).
    pub model: Option<Cow<'a, str>>,
    /// Body `stream` is `true` (Gemini: always false here, streaming is decided by the path).
    pub stream: bool,
    /// Responses `previous_response_id`.
    pub previous_response_id: Option<Cow<'a, str>>,
    /// Responses / Chat `prompt_cache_key`.
    pub prompt_cache_key: Option<Cow<'a, str>>,
    /// Responses `conversation`: a string id or an object `{"id": ...}`.
    pub conversation: Option<&'a RawValue>,
    /// Anthropic `metadata.user_id` (newer Claude Code puts a JSON document in this string).
    pub metadata_user_id: Option<Cow<'a, str>>,
    /// Anthropic `system`: a string or an array of content blocks.
    pub system: Option<&'a RawValue>,
    /// Responses `instructions`.
    pub instructions: Option<Cow<'a, str>>,
    /// Anthropic / Chat `messages`.
    pub messages: Option<&'a RawValue>,
    /// Responses `input`: a string or an array of items.
    pub input: Option<&'a RawValue>,
    /// Gemini `contents`.
    pub contents: Option<&'a RawValue>,
    /// Gemini `systemInstruction` (or `system_instruction`).
    pub system_instruction: Option<&'a RawValue>,
    /// Chat `stream_options.include_usage` is `true`.
    pub stream_options_include_usage: bool,
    /// Responses `store` is `false`: the answer is not kept upstream, so no later request
    /// can continue it (read only, never judged: another value counts as absent).
    pub store_off: bool,
    /// Responses `background` is `true` (read as `store` is: another value counts as absent,
    /// for the upstream to judge).
    pub background: bool,
    /// The service tier the request asks for: OpenAI `service_tier` (`priority`, `fast`,
    /// `flex`), Anthropic `speed: "fast"`; what its cost hold is estimated at (the answer
    /// says what it is billed at). Read only, never judged.
    pub service_tier: ServiceTier,
}

/// Why a request body was refused; the message goes to the client as `invalid_request_error`.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The body is not JSON at all (syntax error, truncated, not UTF-8).
    #[error("request body is not valid JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    /// The body is JSON but not an object.
    #[error("request body must be a JSON object")]
    NotObject,
    /// The body is a JSON object the relay cannot read (a duplicated field, for instance).
    #[error("invalid request body: {0}")]
    Invalid(#[source] serde_json::Error),
    /// A field the protocol requires is absent.
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    /// A field has the wrong JSON type.
    #[error("field `{field}` must be {expected}")]
    BadField {
        /// Field path as the client wrote it (`model`, `metadata.user_id`).
        field: &'static str,
        /// What was expected, phrased for the message (`a string`, `an array`).
        expected: &'static str,
    },
    /// A request the relay does not take, with why.
    #[error("{0}")]
    Unsupported(&'static str),
}

/// Top level of a body, every known field kept raw so that a wrong type becomes a `BadField`
/// with the field's name instead of a serde message; unknown fields are skipped.
#[derive(Deserialize)]
struct RawBody<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    stream: Option<&'a RawValue>,
    #[serde(borrow)]
    previous_response_id: Option<&'a RawValue>,
    #[serde(borrow)]
    prompt_cache_key: Option<&'a RawValue>,
    #[serde(borrow)]
    conversation: Option<&'a RawValue>,
    #[serde(borrow)]
    metadata: Option<&'a RawValue>,
    #[serde(borrow)]
    system: Option<&'a RawValue>,
    #[serde(borrow)]
    instructions: Option<&'a RawValue>,
    #[serde(borrow)]
    messages: Option<&'a RawValue>,
    #[serde(borrow)]
    input: Option<&'a RawValue>,
    #[serde(borrow)]
    contents: Option<&'a RawValue>,
    #[serde(borrow, rename = "systemInstruction", alias = "system_instruction")]
    system_instruction: Option<&'a RawValue>,
    #[serde(borrow)]
    stream_options: Option<&'a RawValue>,
    #[serde(borrow)]
    store: Option<&'a RawValue>,
    #[serde(borrow)]
    background: Option<&'a RawValue>,
    #[serde(borrow)]
    service_tier: Option<&'a RawValue>,
    #[serde(borrow)]
    speed: Option<&'a RawValue>,
}

/// `metadata`: only `user_id` matters.
#[derive(Deserialize)]
struct RawMetadata<'a> {
    #[serde(borrow)]
    user_id: Option<&'a RawValue>,
}

/// `stream_options`: only `include_usage` matters.
#[derive(Deserialize)]
struct RawStreamOptions<'a> {
    #[serde(borrow)]
    include_usage: Option<&'a RawValue>,
}

/// Parses the routing fields of a body in one pass. JSON `null` counts as absent.
pub fn parse_request_body(body: &[u8]) -> Result<RequestBody<'_>, BodyError> {
    let first = body.get(json_scan::skip_ws(body, 0)).copied();
    if first != Some(b'{') {
        // Tell "not JSON" from "JSON, but not an object" for a useful client message.
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
                Ok(_) => BodyError::NotObject,
                Err(e) => BodyError::NotJson(e),
            },
        );
    }
    // Checked as UTF-8 once, the text is parsed without serde checking each string and raw
    // value again; bytes that are not UTF-8 go the slice's way, which tells where they are.
    let parsed = match std::str::from_utf8(body) {
        Ok(text) => serde_json::from_str::<RawBody<'_>>(text),
        Err(_) => serde_json::from_slice(body),
    };
    let raw: RawBody<'_> = parsed.map_err(|e| match e.classify() {
        serde_json::error::Category::Data => BodyError::Invalid(e),
        _ => BodyError::NotJson(e),
    })?;

    let mut metadata_user_id = None;
    if let Some(metadata) = raw.metadata {
        let meta: RawMetadata<'_> =
            serde_json::from_str(metadata.get()).map_err(|_| BodyError::BadField {
                field: "metadata",
                expected: "an object",
            })?;
        metadata_user_id = opt_string(meta.user_id, "metadata.user_id")?;
    }
    let mut stream_options_include_usage = false;
    if let Some(options) = raw.stream_options {
        let options: RawStreamOptions<'_> =
            serde_json::from_str(options.get()).map_err(|_| BodyError::BadField {
                field: "stream_options",
                expected: "an object",
            })?;
        stream_options_include_usage =
            opt_bool(options.include_usage, "stream_options.include_usage")?;
    }

    Ok(RequestBody {
        model: opt_string(raw.model, "model")?,
        stream: opt_bool(raw.stream, "stream")?,
        previous_response_id: opt_string(raw.previous_response_id, "previous_response_id")?,
        prompt_cache_key: opt_string(raw.prompt_cache_key, "prompt_cache_key")?,
        conversation: raw.conversation,
        metadata_user_id,
        system: raw.system,
        instructions: opt_string(raw.instructions, "instructions")?,
        messages: raw.messages,
        input: raw.input,
        contents: raw.contents,
        system_instruction: raw.system_instruction,
        stream_options_include_usage,
        store_off: raw.store.is_some_and(|r| r.get().trim() == "false"),
        background: raw.background.is_some_and(|r| r.get().trim() == "true"),
        service_tier: requested_tier(raw.service_tier, raw.speed),
    })
}

/// The tier a body asks for: Anthropic's `speed: "fast"`, else OpenAI's `service_tier`; a
/// value that is not a plain string counts as none.
fn requested_tier(service_tier: Option<&RawValue>, speed: Option<&RawValue>) -> ServiceTier {
    fn plain(raw: Option<&RawValue>) -> Option<&str> {
        raw.map(|r| r.get().trim())
            .and_then(|t| t.strip_prefix('"')?.strip_suffix('"'))
    }
    match (plain(speed), plain(service_tier)) {
        (Some("fast"), _) => ServiceTier::Fast,
        (_, Some(tier)) => ServiceTier::from_wire(tier),
        _ => ServiceTier::Standard,
    }
}

/// The most output tokens a body allows: Anthropic / Chat `max_tokens`, Chat
/// `max_completion_tokens`, Responses `max_output_tokens`, Gemini
/// `generationConfig.maxOutputTokens`. Only read, never judged (that is the upstream's part):
/// a value that is not a whole number counts as absent, and of a repeated field the last one
/// counts, as most JSON readers take it. Read on demand, apart from [`parse_request_body`].
pub fn output_cap(body: &[u8]) -> Option<u64> {
    let whole = |span: Range<usize>| {
        std::str::from_utf8(body.get(span)?)
            .ok()?
            .parse::<u64>()
            .ok()
    };
    let members = json_scan::object_members(body, json_scan::skip_ws(body, 0))?;
    let mut cap = None;
    for (key, value) in members {
        let is = |name: &str| json_scan::key_is(body, key.clone(), name);
        if is("max_tokens") || is("max_completion_tokens") || is("max_output_tokens") {
            cap = whole(value).or(cap);
        } else if is("generationConfig") || is("generation_config") {
            let inner = json_scan::object_members(body, value.start).unwrap_or_default();
            for (key, value) in inner {
                if json_scan::key_is(body, key.clone(), "maxOutputTokens")
                    || json_scan::key_is(body, key, "max_output_tokens")
                {
                    cap = whole(value).or(cap);
                }
            }
        }
    }
    cap
}

/// Longest model name taken (provider model names are far shorter).
pub const MAX_MODEL_LEN: usize = 256;

/// Checks what `protocol` requires of a parsed body. Field types were already checked by
/// [`parse_request_body`]; this adds presence and shape rules of the protocol.
pub fn validate_for(protocol: Protocol, body: &RequestBody<'_>) -> Result<(), BodyError> {
    // The name is stored with the usage record: PostgreSQL refuses NUL in text, and a record
    // its database cannot store would hold up every record of its batch.
    let bad_name =
        |m: &str| m.is_empty() || m.len() > MAX_MODEL_LEN || m.chars().any(char::is_control);
    let bad_model = || BodyError::BadField {
        field: "model",
        expected: "a model name (1 to 256 bytes, no control characters)",
    };
    if protocol == Protocol::Gemini {
        // The model is in the path and the relay routes on nothing else of a Gemini body; a
        // model the body names anyway is recorded, so it is checked.
        return match body.model.as_deref() {
            Some(m) if bad_name(m) => Err(bad_model()),
            _ => Ok(()),
        };
    }
    match body.model.as_deref() {
        None => return Err(BodyError::MissingField("model")),
        Some(m) if bad_name(m) => return Err(bad_model()),
        Some(_) => {}
    }
    if protocol == Protocol::OpenaiResponses && body.background {
        // The answer to a background request is the queued response, without usage: the
        // model then runs on, its tokens out of the relay's sight and never billed.
        return Err(BodyError::Unsupported(
            "`background: true` is not supported through this relay: a background response \
             is generated after the answer, where the relay cannot meter it; send the request \
             without it (with `stream: true` for a long one)",
        ));
    }
    if matches!(protocol, Protocol::Anthropic | Protocol::OpenaiChat) {
        match body.messages {
            None => return Err(BodyError::MissingField("messages")),
            Some(m) if !m.get().starts_with('[') => {
                return Err(BodyError::BadField {
                    field: "messages",
                    expected: "an array",
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Reads an optional JSON string, borrowing it when it has no escapes.
fn opt_string<'a>(
    raw: Option<&'a RawValue>,
    field: &'static str,
) -> Result<Option<Cow<'a, str>>, BodyError> {
    raw.map(|raw| {
        json_scan::string_value(raw.get()).ok_or(BodyError::BadField {
            field,
            expected: "a string",
        })
    })
    .transpose()
}

/// Reads an optional JSON boolean; absent is `false`.
fn opt_bool(raw: Option<&RawValue>, field: &'static str) -> Result<bool, BodyError> {
    match raw.map(|r| r.get().trim()) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(_) => Err(BodyError::BadField {
            field,
            expected: "a boolean",
        }),
    }
}

/// Replaces the value of the top-level `model` with `new_model`, every other byte unchanged
/// (key order, spacing and number formatting survive). `None` when the body is not a JSON
/// object or has no top-level `model`.
pub fn rewrite_model(body: &[u8], new_model: &str) -> Option<Vec<u8>> {
    let members = json_scan::object_members(body, json_scan::skip_ws(body, 0))?;
    let spans: Vec<Range<usize>> = members
        .into_iter()
        .filter(|(key, _)| json_scan::key_is(body, key.clone(), "model"))
        .map(|(_, value)| value)
        .collect();
    if spans.is_empty() {
        return None;
    }
    let encoded = serde_json::to_string(new_model).ok()?;
    let edits: Vec<(Range<usize>, &str)> =
        spans.into_iter().map(|s| (s, encoded.as_str())).collect();
    Some(splice(body, &edits))
}

/// Chat: makes the body ask for the final usage chunk (`"stream_options":{"include_usage":true}`),
/// adding or forcing only that, every other byte unchanged. `None` when nothing needs to change
/// (already `true`) or the body is not a JSON object.
pub fn add_stream_include_usage(body: &[u8]) -> Option<Vec<u8>> {
    let open = json_scan::skip_ws(body, 0);
    let members = json_scan::object_members(body, open)?;
    let options = members
        .iter()
        .find(|(key, _)| json_scan::key_is(body, key.clone(), "stream_options"))
        .map(|(_, value)| value.clone());
    let Some(options) = options else {
        let sep = if members.is_empty() { "" } else { "," };
        let text = format!(r#""stream_options":{{"include_usage":true}}{sep}"#);
        return Some(splice(body, &[(open + 1..open + 1, text.as_str())]));
    };
    if body.get(options.start) != Some(&b'{') {
        // `null` or a wrong type: the whole value becomes the object we need.
        return Some(splice(body, &[(options, r#"{"include_usage":true}"#)]));
    }
    let inner = json_scan::object_members(body, options.start)?;
    let flags: Vec<Range<usize>> = inner
        .iter()
        .filter(|(key, _)| json_scan::key_is(body, key.clone(), "include_usage"))
        .map(|(_, value)| value.clone())
        .collect();
    if flags.is_empty() {
        let sep = if inner.is_empty() { "" } else { "," };
        let text = format!(r#""include_usage":true{sep}"#);
        let at = options.start + 1;
        return Some(splice(body, &[(at..at, text.as_str())]));
    }
    let edits: Vec<(Range<usize>, &str)> = flags
        .into_iter()
        .filter(|span| body.get(span.clone()) != Some(b"true".as_slice()))
        .map(|span| (span, "true"))
        .collect();
    if edits.is_empty() {
        return None;
    }
    Some(splice(body, &edits))
}

/// Copies `body` with each span replaced by its text; spans are sorted and disjoint.
fn splice(body: &[u8], edits: &[(Range<usize>, &str)]) -> Vec<u8> {
    let extra: usize = edits.iter().map(|(_, text)| text.len()).sum();
    let mut out = Vec::with_capacity(body.len() + extra);
    let mut at = 0;
    for (span, text) in edits {
        out.extend_from_slice(body.get(at..span.start).unwrap_or_default());
        out.extend_from_slice(text.as_bytes());
        at = span.end;
    }
    out.extend_from_slice(body.get(at..).unwrap_or_default());
    out
}

/// A small scanner over JSON bytes that finds value spans without building values: enough to
/// edit one top-level field in place and to walk the first elements of a large array lazily.
///
/// It trusts the structure it is given (bodies are validated by [`parse_request_body`] first)
/// but never panics on any input: malformed bytes end a walk early or give `None`.
pub(crate) mod json_scan {
    use std::borrow::Cow;
    use std::ops::Range;

    use memchr::memchr;

    /// Index of the first non-whitespace byte at or after `i`.
    pub(crate) fn skip_ws(b: &[u8], mut i: usize) -> usize {
        while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            i += 1;
        }
        i
    }

    /// With `i` at an opening quote: the index just past the closing quote.
    pub(crate) fn string_end(b: &[u8], i: usize) -> Option<usize> {
        let start = i + 1;
        let mut j = start;
        loop {
            // Jump from quote to quote: prompts have far fewer quotes than escapes (`\n`).
            let k = j + memchr(b'"', b.get(j..)?)?;
            let backslashes = b
                .get(start..k)?
                .iter()
                .rev()
                .take_while(|&&c| c == b'\\')
                .count();
            if backslashes % 2 == 0 {
                return Some(k + 1);
            }
            j = k + 1;
        }
    }

    /// With `i` at the first byte of a value: the index just past the value.
    pub(crate) fn value_end(b: &[u8], i: usize) -> Option<usize> {
        match *b.get(i)? {
            b'"' => string_end(b, i),
            b'{' | b'[' => {
                let mut depth = 0usize;
                let mut j = i;
                loop {
                    match *b.get(j)? {
                        b'"' => {
                            j = string_end(b, j)?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth = depth.checked_sub(1)?;
                            if depth == 0 {
                                return Some(j + 1);
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
            }
            b',' | b':' | b'}' | b']' => None,
            _ => {
                // Number or literal: up to the next delimiter.
                let len = b
                    .get(i..)?
                    .iter()
                    .position(|c| matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                    .unwrap_or(b.len() - i);
                Some(i + len)
            }
        }
    }

    /// Key and value spans of the object whose `{` is at `open`, in order; `None` when the
    /// bytes there are not a well-formed object.
    pub(crate) fn object_members(
        b: &[u8],
        open: usize,
    ) -> Option<Vec<(Range<usize>, Range<usize>)>> {
        let mut it = members(b, open);
        let all: Vec<_> = it.by_ref().collect();
        it.closed.then_some(all)
    }

    /// The members of the object whose `{` is at `open`, lazily, as key and value spans (key
    /// quotes included). Yields nothing when there is no object there.
    pub(crate) fn members(b: &[u8], open: usize) -> Members<'_> {
        let object = b.get(open) == Some(&b'{');
        Members {
            b,
            pos: open + 1,
            done: !object,
            started: false,
            closed: false,
        }
    }

    /// Iterator of [`members`].
    pub(crate) struct Members<'a> {
        b: &'a [u8],
        pos: usize,
        done: bool,
        /// A member was read: the next one needs a comma first.
        started: bool,
        /// The closing `}` was reached (the object was well formed as far as scanned).
        closed: bool,
    }

    impl Iterator for Members<'_> {
        type Item = (Range<usize>, Range<usize>);

        fn next(&mut self) -> Option<Self::Item> {
            if self.done {
                return None;
            }
            let item = self.step();
            if item.is_none() {
                self.done = true;
            }
            item
        }
    }

    impl Members<'_> {
        fn step(&mut self) -> Option<(Range<usize>, Range<usize>)> {
            let b = self.b;
            let mut i = skip_ws(b, self.pos);
            match (b.get(i)?, self.started) {
                (b'}', _) => {
                    self.closed = true;
                    return None;
                }
                (b',', true) => i = skip_ws(b, i + 1),
                (_, true) => return None,
                (_, false) => {}
            }
            self.started = true;
            if b.get(i) != Some(&b'"') {
                return None;
            }
            let key_end = string_end(b, i)?;
            let colon = skip_ws(b, key_end);
            if b.get(colon) != Some(&b':') {
                return None;
            }
            let value_start = skip_ws(b, colon + 1);
            let value_stop = value_end(b, value_start)?;
            self.pos = value_stop;
            Some((i..key_end, value_start..value_stop))
        }
    }

    /// The members of a JSON object token as `(key token, value token)` text, lazily; nothing
    /// when `raw` is not an object.
    pub(crate) fn fields(raw: &str) -> impl Iterator<Item = (&str, &str)> {
        let b = raw.as_bytes();
        members(b, skip_ws(b, 0))
            .filter_map(move |(key, value)| Some((raw.get(key)?, raw.get(value)?)))
    }

    /// Whether the key token at `span` (quotes included) names `name`, escapes decoded.
    pub(crate) fn key_is(b: &[u8], span: Range<usize>, name: &str) -> bool {
        let Some(raw) = b.get(span) else {
            return false;
        };
        if memchr(b'\\', raw).is_none() {
            return raw.len() == name.len() + 2
                && raw.get(1..raw.len() - 1) == Some(name.as_bytes());
        }
        serde_json::from_slice::<String>(raw).is_ok_and(|k| k == name)
    }

    /// The text of a JSON string token (quotes included), borrowed when it has no escapes;
    /// `None` when the token is not a string.
    pub(crate) fn string_value(raw: &str) -> Option<Cow<'_, str>> {
        let raw = raw.trim();
        let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
        if memchr(b'\\', inner.as_bytes()).is_none() {
            return Some(Cow::Borrowed(inner));
        }
        serde_json::from_str::<String>(raw).ok().map(Cow::Owned)
    }

    /// The elements of a JSON array, lazily: walking the first few elements of a 200 KiB array
    /// costs only those elements. A non-array value is yielded as the only element, so callers
    /// accept a lone object where an array is usual.
    pub(crate) fn elements(raw: &str) -> Elements<'_> {
        let b = raw.as_bytes();
        let start = skip_ws(b, 0);
        match b.get(start) {
            Some(b'[') => Elements {
                raw,
                pos: start + 1,
                single: false,
                done: false,
            },
            Some(_) => Elements {
                raw,
                pos: start,
                single: true,
                done: false,
            },
            None => Elements {
                raw,
                pos: 0,
                single: false,
                done: true,
            },
        }
    }

    /// Iterator of [`elements`].
    pub(crate) struct Elements<'a> {
        raw: &'a str,
        pos: usize,
        single: bool,
        done: bool,
    }

    impl<'a> Iterator for Elements<'a> {
        type Item = &'a str;

        fn next(&mut self) -> Option<&'a str> {
            if self.done {
                return None;
            }
            let b = self.raw.as_bytes();
            if self.single {
                self.done = true;
                let end = value_end(b, self.pos)?;
                return self.raw.get(self.pos..end);
            }
            let mut i = skip_ws(b, self.pos);
            if b.get(i) == Some(&b',') {
                i = skip_ws(b, i + 1);
            }
            let item = match b.get(i) {
                Some(b']') | None => None,
                Some(_) => value_end(b, i).and_then(|end| {
                    self.pos = end;
                    self.raw.get(i..end)
                }),
            };
            if item.is_none() {
                self.done = true;
            }
            item
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(e: &BodyError) -> Option<&'static str> {
        match e {
            BodyError::BadField { field, .. } => Some(field),
            BodyError::MissingField(field) => Some(field),
            _ => None,
        }
    }

    #[test]
    fn parses_routing_fields_and_borrows() {
        let body = br#"{"model":"claude-sonnet-4-5","stream":true,"max_tokens":10,
            "metadata":{"user_id":"user_ab_account__session_1"},
            "system":[{"type":"text","text":"hi"}],"messages":[{"role":"user","content":"x"}],
            "tools":[{"name":"t","input_schema":{"type":"object"}}]}"#;
        let parsed = parse_request_body(body).expect("parses");
        assert_eq!(parsed.model.as_deref(), Some("claude-sonnet-4-5"));
        assert!(matches!(parsed.model, Some(Cow::Borrowed(_))));
        assert!(parsed.stream);
        assert_eq!(
            parsed.metadata_user_id.as_deref(),
            Some("user_ab_account__session_1")
        );
        assert_eq!(
            parsed.system.map(RawValue::get),
            Some(r#"[{"type":"text","text":"hi"}]"#)
        );
        assert_eq!(
            parsed.messages.map(RawValue::get),
            Some(r#"[{"role":"user","content":"x"}]"#)
        );
        assert!(validate_for(Protocol::Anthropic, &parsed).is_ok());
    }

    #[test]
    fn escaped_strings_are_decoded() {
        let body = br#"{"model":"gpt-5","instructions":"line1\nline2 \"q\"",
            "metadata":{"user_id":"{\"device_id\":\"d\",\"session_id\":\"s\"}"}}"#;
        let parsed = parse_request_body(body).expect("parses");
        assert_eq!(parsed.instructions.as_deref(), Some("line1\nline2 \"q\""));
        assert_eq!(
            parsed.metadata_user_id.as_deref(),
            Some(r#"{"device_id":"d","session_id":"s"}"#)
        );
    }

    #[test]
    fn other_fields() {
        let body = br#"{"model":"gpt-5","previous_response_id":"resp_1","prompt_cache_key":"pck",
            "conversation":{"id":"conv_1"},"input":"hello","stream_options":{"include_usage":true},
            "stream":false,"unknown":[1,2,{"a":null}]}"#;
        let parsed = parse_request_body(body).expect("parses");
        assert_eq!(parsed.previous_response_id.as_deref(), Some("resp_1"));
        assert_eq!(parsed.prompt_cache_key.as_deref(), Some("pck"));
        assert_eq!(
            parsed.conversation.map(RawValue::get),
            Some(r#"{"id":"conv_1"}"#)
        );
        assert_eq!(parsed.input.map(RawValue::get), Some(r#""hello""#));
        assert!(parsed.stream_options_include_usage);
        assert!(!parsed.stream);
        assert!(!parsed.store_off, "store absent");
        for (body, off) in [
            (&br#"{"model":"m","store":false}"#[..], true),
            (br#"{"model":"m","store": false }"#, true),
            (br#"{"model":"m","store":true}"#, false),
            (br#"{"model":"m","store":null}"#, false),
            (br#"{"model":"m","store":"no"}"#, false),
        ] {
            let parsed = parse_request_body(body).expect("parses");
            assert_eq!(parsed.store_off, off, "{}", String::from_utf8_lossy(body));
        }
        // A background response is refused on the Responses route only (other protocols have
        // no such field; the relay leaves what they make of it to them).
        for (body, refused) in [
            (&br#"{"model":"m","input":"x","background":true}"#[..], true),
            (br#"{"model":"m","input":"x","background": true }"#, true),
            (br#"{"model":"m","input":"x","background":false}"#, false),
            (br#"{"model":"m","input":"x","background":null}"#, false),
            (br#"{"model":"m","input":"x","background":"yes"}"#, false),
            (br#"{"model":"m","input":"x"}"#, false),
        ] {
            let parsed = parse_request_body(body).expect("parses");
            let verdict = validate_for(Protocol::OpenaiResponses, &parsed);
            assert_eq!(
                matches!(verdict, Err(BodyError::Unsupported(m)) if m.contains("background")),
                refused,
                "{}",
                String::from_utf8_lossy(body)
            );
            assert_eq!(verdict.is_ok(), !refused);
        }
        // The tier a request asks for.
        for (body, tier) in [
            (
                &br#"{"model":"m","service_tier":"priority"}"#[..],
                ServiceTier::Priority,
            ),
            (
                br#"{"model":"m","service_tier":"fast"}"#,
                ServiceTier::Priority,
            ),
            (br#"{"model":"m","service_tier":"flex"}"#, ServiceTier::Flex),
            (
                br#"{"model":"m","service_tier":"auto"}"#,
                ServiceTier::Standard,
            ),
            (br#"{"model":"m","service_tier":7}"#, ServiceTier::Standard),
            (br#"{"model":"m","speed":"fast"}"#, ServiceTier::Fast),
            (
                br#"{"model":"m","speed":"standard"}"#,
                ServiceTier::Standard,
            ),
            (br#"{"model":"m"}"#, ServiceTier::Standard),
        ] {
            let parsed = parse_request_body(body).expect("parses");
            assert_eq!(
                parsed.service_tier,
                tier,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let chat = br#"{"model":"m","messages":[],"background":true}"#;
        let parsed = parse_request_body(chat).expect("parses");
        assert!(validate_for(Protocol::OpenaiChat, &parsed).is_ok());

        let gemini = br#"{"contents":[{"role":"user","parts":[{"text":"x"}]}],
            "system_instruction":{"parts":[{"text":"s"}]}}"#;
        let parsed = parse_request_body(gemini).expect("parses");
        assert!(parsed.contents.is_some());
        assert!(parsed.system_instruction.is_some());
        assert!(parsed.model.is_none());
        assert!(validate_for(Protocol::Gemini, &parsed).is_ok());
        let camel = br#"{"contents":[],"systemInstruction":{"parts":[]}}"#;
        assert!(parse_request_body(camel)
            .expect("parses")
            .system_instruction
            .is_some());
    }

    #[test]
    fn output_caps_of_every_protocol() {
        let cap = output_cap;
        assert_eq!(cap(br#"{"model":"m","max_tokens":32000}"#), Some(32_000));
        assert_eq!(
            cap(br#"{"model":"m","max_completion_tokens":700}"#),
            Some(700)
        );
        assert_eq!(cap(br#"{"model":"m","max_output_tokens":128}"#), Some(128));
        assert_eq!(
            cap(br#"{"generationConfig":{"temperature":0.2,"maxOutputTokens":64}}"#),
            Some(64)
        );
        assert_eq!(
            cap(br#"{"generation_config":{"max_output_tokens":65}}"#),
            Some(65)
        );
        // Only read: what the upstream would refuse is the upstream's to say.
        assert_eq!(cap(br#"{"model":"m"}"#), None);
        assert_eq!(cap(br#"{"model":"m","max_tokens":-1}"#), None);
        assert_eq!(cap(br#"{"model":"m","max_tokens":"9"}"#), None);
        assert_eq!(cap(br#"{"model":"m","max_tokens":1.5}"#), None);
        assert_eq!(cap(br#"{"generationConfig":[]}"#), None);
        // Repeated: the last whole number counts, and the body is still taken.
        let twice = br#"{"model":"m","max_tokens":5,"messages":[],"max_tokens":7}"#;
        assert_eq!(cap(twice), Some(7));
        assert!(parse_request_body(twice).is_ok());
        let both = br#"{"contents":[],"generationConfig":{"maxOutputTokens":3},
            "generation_config":{"max_output_tokens":4}}"#;
        assert_eq!(cap(both), Some(4));
        assert!(parse_request_body(both).is_ok());
        // Nested caps elsewhere do not count; neither do bodies that are not objects.
        assert_eq!(cap(br#"{"model":"m","metadata":{"max_tokens":9}}"#), None);
        assert_eq!(cap(b"[1]"), None);
        assert_eq!(cap(b"not json"), None);
    }

    #[test]
    fn nulls_count_as_absent() {
        let body = br#"{"model":"m","stream":null,"metadata":null,"instructions":null,
            "previous_response_id":null,"stream_options":null,"messages":[]}"#;
        let parsed = parse_request_body(body).expect("parses");
        assert!(!parsed.stream);
        assert!(parsed.metadata_user_id.is_none());
        assert!(parsed.instructions.is_none());
        assert!(parsed.previous_response_id.is_none());
    }

    #[test]
    fn bad_input_gives_errors() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "not json"),
            (b"   ", "not json"),
            (b"{", "not json"),
            (b"{\"model\":\"m\",}", "not json"),
            (b"\xff\xfe{}", "not json"),
            (b"{\"model\":\"\xff\"}", "not json"),
            (b"{\"messages\":[{\"content\":\"a\xffb\"}]}", "not json"),
            (b"[1,2]", "not object"),
            (b"\"model\"", "not object"),
            (b"null", "not object"),
            (b"{\"model\":1,\"model\":2}", "invalid"),
            (b"{\"model\":5}", "model"),
            (b"{\"model\":[\"a\"]}", "model"),
            (b"{\"stream\":\"true\"}", "stream"),
            (b"{\"stream\":1}", "stream"),
            (b"{\"metadata\":\"x\"}", "metadata"),
            (b"{\"metadata\":{\"user_id\":7}}", "metadata.user_id"),
            (b"{\"instructions\":{}}", "instructions"),
            (b"{\"previous_response_id\":1}", "previous_response_id"),
            (b"{\"prompt_cache_key\":true}", "prompt_cache_key"),
            (b"{\"stream_options\":[]}", "stream_options"),
            (
                b"{\"stream_options\":{\"include_usage\":\"yes\"}}",
                "stream_options.include_usage",
            ),
        ];
        for (body, want) in cases {
            let err = parse_request_body(body).expect_err(want);
            let got = match &err {
                BodyError::NotJson(_) => "not json",
                BodyError::NotObject => "not object",
                BodyError::Invalid(_) => "invalid",
                other => field(other).unwrap_or("?"),
            };
            assert_eq!(got, *want, "{}", String::from_utf8_lossy(body));
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn validation_per_protocol() {
        let cases: &[(Protocol, &str, Result<(), &str>)] = &[
            (Protocol::Anthropic, r#"{"messages":[]}"#, Err("model")),
            (
                Protocol::Anthropic,
                r#"{"model":"","messages":[]}"#,
                Err("model"),
            ),
            (Protocol::Anthropic, r#"{"model":"m"}"#, Err("messages")),
            (
                Protocol::Anthropic,
                r#"{"model":"m","messages":{"role":"user"}}"#,
                Err("messages"),
            ),
            (
                Protocol::Anthropic,
                r#"{"model":"m","messages":[]}"#,
                Ok(()),
            ),
            (
                Protocol::OpenaiChat,
                r#"{"model":"m","messages":"hi"}"#,
                Err("messages"),
            ),
            (
                Protocol::OpenaiChat,
                r#"{"model":"m","messages":[]}"#,
                Ok(()),
            ),
            (Protocol::OpenaiResponses, r#"{"input":"x"}"#, Err("model")),
            (
                Protocol::OpenaiResponses,
                r#"{"model":"m","input":"x"}"#,
                Ok(()),
            ),
            (Protocol::Gemini, r#"{"contents":[]}"#, Ok(())),
            (Protocol::Gemini, r#"{}"#, Ok(())),
            (
                Protocol::Gemini,
                r#"{"model":"g\u0000","contents":[]}"#,
                Err("model"),
            ),
            // A model name no database would store, or no provider has.
            (
                Protocol::Anthropic,
                r#"{"model":"x\u0000","messages":[]}"#,
                Err("model"),
            ),
            (
                Protocol::OpenaiResponses,
                r#"{"model":"a\nb","input":"x"}"#,
                Err("model"),
            ),
            (
                Protocol::OpenaiChat,
                r#"{"model":"","messages":[]}"#,
                Err("model"),
            ),
        ];
        let long = format!(
            r#"{{"model":"{}","input":"x"}}"#,
            "m".repeat(MAX_MODEL_LEN + 1)
        );
        let longest = format!(r#"{{"model":"{}","input":"x"}}"#, "m".repeat(MAX_MODEL_LEN));
        let parsed = parse_request_body(long.as_bytes()).expect("parses");
        assert!(validate_for(Protocol::OpenaiResponses, &parsed).is_err());
        let parsed = parse_request_body(longest.as_bytes()).expect("parses");
        assert!(validate_for(Protocol::OpenaiResponses, &parsed).is_ok());
        for (protocol, body, want) in cases {
            let parsed = parse_request_body(body.as_bytes()).expect("parses");
            let got = validate_for(*protocol, &parsed);
            match (want, &got) {
                (Ok(()), Ok(())) => {}
                (Err(f), Err(e)) => assert_eq!(field(e), Some(*f), "{protocol:?} {body}"),
                _ => panic!("{protocol:?} {body}: {got:?}"),
            }
        }
        let parsed = parse_request_body(br#"{"messages":[]}"#).expect("parses");
        let err = validate_for(Protocol::OpenaiChat, &parsed).expect_err("no model");
        assert_eq!(err.to_string(), "missing field `model`");
    }

    #[test]
    fn rewrite_model_keeps_other_bytes() {
        let cases: &[(&str, &str, Option<&str>)] = &[
            (
                r#"{"model":"a","x":1.50}"#,
                "b",
                Some(r#"{"model":"b","x":1.50}"#),
            ),
            (
                r#"{ "x" : {"model":"nested"}, "model" : "a" , "y":[1e3] }"#,
                "bb",
                Some(r#"{ "x" : {"model":"nested"}, "model" : "bb" , "y":[1e3] }"#),
            ),
            (
                r#"{"s":"\"model\":\"a\"","model":"a"}"#,
                "b",
                Some(r#"{"s":"\"model\":\"a\"","model":"b"}"#),
            ),
            (r#"{"mod\u0065l":"a"}"#, "b", Some(r#"{"mod\u0065l":"b"}"#)),
            (r#"{"model":null}"#, "b", Some(r#"{"model":"b"}"#)),
            (r#"{"model":"a"}"#, "x\"y", Some(r#"{"model":"x\"y"}"#)),
            (
                "{\n  \"messages\": [{\"model\": 1}],\n  \"model\": \"a\"\n}",
                "b",
                Some("{\n  \"messages\": [{\"model\": 1}],\n  \"model\": \"b\"\n}"),
            ),
            (r#"{"models":"a"}"#, "b", None),
            (r#"{}"#, "b", None),
            (r#"["model"]"#, "b", None),
            (r#"{"model":"a""#, "b", None),
            ("", "b", None),
        ];
        for (body, model, want) in cases {
            let got = rewrite_model(body.as_bytes(), model);
            assert_eq!(
                got.as_deref().map(String::from_utf8_lossy).as_deref(),
                *want,
                "{body}"
            );
        }
    }

    #[test]
    fn rewrite_model_on_a_real_body() {
        let capture: serde_json::Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/client-requests/claude-code.turn1.json"
        ))
        .expect("fixture");
        let body = serde_json::to_vec_pretty(&capture["body"]).expect("body");
        let out = rewrite_model(&body, "claude-sonnet-4-5").expect("rewritten");
        let before: serde_json::Value = serde_json::from_slice(&body).expect("json");
        let mut after: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(after["model"], "claude-sonnet-4-5");
        // The tool schema also has a `model` property: it must be left alone.
        assert_eq!(
            after["tools"][0]["input_schema"]["properties"]["model"]["type"],
            "string"
        );
        after["model"] = before["model"].clone();
        assert_eq!(after, before);
        assert_eq!(
            out.len(),
            body.len() - "claude-opus-4-8".len() + "claude-sonnet-4-5".len()
        );
    }

    #[test]
    fn include_usage_is_added_or_forced() {
        let cases: &[(&str, Option<&str>)] = &[
            (
                r#"{"model":"m","stream":true}"#,
                Some(r#"{"stream_options":{"include_usage":true},"model":"m","stream":true}"#),
            ),
            (
                r#"{}"#,
                Some(r#"{"stream_options":{"include_usage":true}}"#),
            ),
            (
                r#" { } "#,
                Some(r#" {"stream_options":{"include_usage":true} } "#),
            ),
            (
                r#"{"stream_options":{"include_usage":false},"n":1.0}"#,
                Some(r#"{"stream_options":{"include_usage":true},"n":1.0}"#),
            ),
            (r#"{"stream_options":{"include_usage":true}}"#, None),
            (
                r#"{"stream_options":{}}"#,
                Some(r#"{"stream_options":{"include_usage":true}}"#),
            ),
            (
                r#"{"stream_options":{"include_obfuscation":false}}"#,
                Some(r#"{"stream_options":{"include_usage":true,"include_obfuscation":false}}"#),
            ),
            (
                r#"{"stream_options":null,"x":"y"}"#,
                Some(r#"{"stream_options":{"include_usage":true},"x":"y"}"#),
            ),
            (r#"[]"#, None),
            (r#"{"a":"#, None),
        ];
        for (body, want) in cases {
            let got = add_stream_include_usage(body.as_bytes());
            let got = got.as_deref().map(String::from_utf8_lossy);
            assert_eq!(got.as_deref(), *want, "{body}");
            if let Some(out) = got {
                let parsed = parse_request_body(out.as_bytes()).expect("still JSON");
                assert!(parsed.stream_options_include_usage, "{out}");
            }
        }
    }

    #[test]
    fn elements_walk_lazily() {
        let raw = r#" [ {"a":"]"} , "x,y" ,[1,[2]], 3 ,true] "#;
        let items: Vec<&str> = json_scan::elements(raw).collect();
        assert_eq!(items, [r#"{"a":"]"}"#, r#""x,y""#, "[1,[2]]", "3", "true"]);
        assert_eq!(json_scan::elements("[]").count(), 0);
        assert_eq!(
            json_scan::elements(r#"{"a":1}"#).collect::<Vec<_>>(),
            [r#"{"a":1}"#]
        );
        assert_eq!(json_scan::elements("").count(), 0);
        // Stops early on malformed bytes instead of panicking.
        assert_eq!(json_scan::elements(r#"[1,"#).collect::<Vec<_>>(), ["1"]);
        assert_eq!(json_scan::elements(r#"["abc"#).count(), 0);
    }

    #[test]
    fn truncated_and_mangled_bodies_never_panic() {
        let bodies = [
            include_str!("../../tests/fixtures/client-requests/sdk-anthropic.turn2.json"),
            include_str!("../../tests/fixtures/client-requests/sdk-openai-chat.turn2.json"),
            include_str!("../../tests/fixtures/client-requests/sdk-gemini.turn2.json"),
        ];
        for capture in bodies {
            let capture: serde_json::Value = serde_json::from_str(capture).expect("fixture");
            let body = serde_json::to_vec(&capture["body"]).expect("body");
            for cut in 0..body.len() {
                let part = &body[..cut];
                let _ = parse_request_body(part);
                let _ = rewrite_model(part, "x");
                let _ = add_stream_include_usage(part);
                let _ = json_scan::elements(&String::from_utf8_lossy(part)).count();
                let mut mangled = body.clone();
                mangled[cut] = b'"';
                let _ = parse_request_body(&mangled);
                let _ = rewrite_model(&mangled, "x");
                let _ = add_stream_include_usage(&mangled);
            }
        }
    }

    #[test]
    fn every_fixture_parses_and_validates() {
        let fixtures = [
            (
                Protocol::Anthropic,
                include_str!("../../tests/fixtures/client-requests/claude-code.turn1.json"),
            ),
            (
                Protocol::Anthropic,
                include_str!("../../tests/fixtures/client-requests/sdk-anthropic.turn2.json"),
            ),
            (
                Protocol::OpenaiResponses,
                include_str!("../../tests/fixtures/client-requests/codex-cli.turn2.json"),
            ),
            (
                Protocol::OpenaiResponses,
                include_str!(
                    "../../tests/fixtures/client-requests/sdk-openai-responses.turn1.json"
                ),
            ),
            (
                Protocol::OpenaiChat,
                include_str!("../../tests/fixtures/client-requests/sdk-openai-chat.turn2.json"),
            ),
            (
                Protocol::Gemini,
                include_str!("../../tests/fixtures/client-requests/sdk-gemini.turn2.json"),
            ),
        ];
        for (protocol, capture) in fixtures {
            let capture: serde_json::Value = serde_json::from_str(capture).expect("fixture");
            let body = serde_json::to_vec(&capture["body"]).expect("body");
            let parsed = parse_request_body(&body).expect("parses");
            validate_for(protocol, &parsed).expect("valid");
            assert_eq!(parsed.stream, capture["body"]["stream"] == true);
        }
    }
}
