//! Session identity (DESIGN §7): the key that keeps every turn of one conversation on the same
//! upstream account, derived from what each client sends, for all four protocols.
//!
//! Material, first that exists, per protocol:
//! - Anthropic: header `x-claude-code-session-id`; the session part of `metadata.user_id`;
//!   else the system prompt plus the first N messages.
//! - OpenAI Responses: headers `session_id`, `session-id`, `x-session-id`, `conversation_id`;
//!   body `prompt_cache_key`, `conversation`; else `instructions`; else the first `input` message.
//! - OpenAI Chat: headers `session_id`, `session-id`, `x-session-id`; body `prompt_cache_key`;
//!   else the leading system messages plus the first N other messages.
//! - Gemini: header `x-session-id`; else `systemInstruction` plus the first N `contents`.
//!
//! An explicit session id is hashed the same way whichever header or field carried it, so a
//! client that sends it in both places (Claude Code, Codex) keeps its key if one goes missing.
//! Content is hashed from decoded text, part by part, each part tagged and length-framed so that
//! `"ab"+"c"` and `"a"+"bc"` differ; per-turn attributes (`cache_control`, ids) are never read.

use std::borrow::Cow;

use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::request_body::{json_scan, RequestBody};
use crate::Protocol;

/// How a route derives its session key (`session.strategy` in config).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionStrategy {
    /// Explicit session ids, else the conversation's opening content (the default).
    #[default]
    Content,
    /// One binding per relay API key.
    ApiKey,
    /// No stickiness.
    None,
}

/// What the session key is derived from.
pub struct SessionInput<'a> {
    /// The client protocol.
    pub protocol: Protocol,
    /// Id of the relay API key: keys are scoped per key, two tenants never share a binding.
    pub api_key_id: &'a str,
    /// The client's request headers.
    pub headers: &'a http::HeaderMap,
    /// The parsed body.
    pub body: &'a RequestBody<'a>,
    /// N: how many conversation messages the content digest covers (0 is taken as 1).
    pub message_count: usize,
}

impl<'a> SessionInput<'a> {
    /// An input with the default message count (1).
    pub fn new(
        protocol: Protocol,
        api_key_id: &'a str,
        headers: &'a http::HeaderMap,
        body: &'a RequestBody<'a>,
    ) -> Self {
        SessionInput {
            protocol,
            api_key_id,
            headers,
            body,
            message_count: 1,
        }
    }
}

/// Session key `{api_key_id}:{protocol}:{digest}` (digest = first 16 hex chars of SHA-256 of
/// the material), or `apikey:{api_key_id}:{protocol}` for the `api_key` strategy (the binding
/// store prefixes it; per protocol, as no account serves two). `None` for strategy `none`, or when the request carries no material at all.
pub fn session_key(strategy: SessionStrategy, input: &SessionInput<'_>) -> Option<String> {
    match strategy {
        SessionStrategy::None => None,
        SessionStrategy::ApiKey => Some(format!(
            "apikey:{}:{}",
            input.api_key_id,
            input.protocol.as_str()
        )),
        SessionStrategy::Content => {
            let mut material = Material::default();
            let n = input.message_count.max(1);
            let found = match input.protocol {
                Protocol::Anthropic => anthropic(&mut material, input, n),
                Protocol::OpenaiResponses => responses(&mut material, input),
                Protocol::OpenaiChat => chat(&mut material, input, n),
                Protocol::Gemini => gemini(&mut material, input, n),
            };
            if !found {
                return None;
            }
            let digest = material.hasher.finalize();
            // Pushed into one allocation of the right size, once per request: `format!` over
            // a hex string made apart was two allocations and the formatter's machinery.
            let (id, protocol) = (input.api_key_id, input.protocol.as_str());
            let mut key = String::with_capacity(id.len() + protocol.len() + 18);
            key.push_str(id);
            key.push(':');
            key.push_str(protocol);
            key.push(':');
            key.push_str(crate::api_key_auth::hex_into(
                digest.get(..8)?,
                &mut [0u8; 16],
            ));
            Some(key)
        }
    }
}

/// The `session_hash` filter's settings: strategy and message count, fixed at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionHash {
    strategy: SessionStrategy,
    message_count: usize,
}

impl SessionHash {
    /// A filter with this strategy and message count (N).
    pub fn new(strategy: SessionStrategy, message_count: usize) -> Self {
        SessionHash {
            strategy,
            message_count,
        }
    }

    /// The configured strategy.
    pub fn strategy(&self) -> SessionStrategy {
        self.strategy
    }

    /// The session key of one request under this filter's settings.
    pub fn key(
        &self,
        protocol: Protocol,
        api_key_id: &str,
        headers: &http::HeaderMap,
        body: &RequestBody<'_>,
    ) -> Option<String> {
        let input = SessionInput {
            protocol,
            api_key_id,
            headers,
            body,
            message_count: self.message_count,
        };
        session_key(self.strategy, &input)
    }
}

/// Claude Code's first system block, `x-anthropic-billing-header: cc_version=...;`, changes
/// between prompts: hashing it would give every turn a new key. Matched against the raw JSON
/// token, hence the leading quote.
const BILLING_HEADER_PREFIX: &str = "\"x-anthropic-billing-header:";

/// Part tags of the material. Every part is `tag, bytes, length of bytes (u64 LE)`: read from
/// the end, the framing is unambiguous, and a length trailer lets decoded text be streamed into
/// the hasher without knowing its length first.
mod tag {
    /// An explicit session id (header or body field).
    pub const ID: u8 = b'I';
    /// System prompt / instructions text.
    pub const SYSTEM: u8 = b'S';
    /// Start of a message: its role.
    pub const ROLE: u8 = b'R';
    /// Text of a message part.
    pub const TEXT: u8 = b'T';
    /// Media type of inline data (image, document, audio).
    pub const MEDIA: u8 = b'M';
    /// Decoded length of inline data.
    pub const LEN: u8 = b'L';
    /// SHA-256 of inline data.
    pub const DATA: u8 = b'D';
    /// A URL or file URI referencing content.
    pub const URL: u8 = b'U';
    /// A provider file id.
    pub const FILE: u8 = b'F';
}

/// The running digest of the material. Every `&str` token below is raw JSON text, a slice of
/// the client's body.
#[derive(Default)]
struct Material {
    hasher: Sha256,
    parts: usize,
}

impl Material {
    /// Adds one part of raw bytes.
    fn bytes(&mut self, tag: u8, data: &[u8]) {
        self.hasher.update([tag]);
        self.hasher.update(data);
        self.hasher.update((data.len() as u64).to_le_bytes());
        self.parts += 1;
    }

    /// Adds one part from a JSON string token, decoded; `false` (nothing added) when the token
    /// is not a string.
    fn json_str(&mut self, tag: u8, token: &str) -> bool {
        if !token.starts_with('"') {
            return false;
        }
        self.hasher.update([tag]);
        // The token was validated by serde_json, so decoding cannot fail; if it ever did, the
        // trailer still makes the part deterministic.
        let len = feed_json_str(&mut self.hasher, token).unwrap_or(u64::MAX);
        self.hasher.update(len.to_le_bytes());
        self.parts += 1;
        true
    }

    /// Adds an optional JSON string part.
    fn opt_str(&mut self, tag: u8, token: Option<&str>) {
        if let Some(token) = token {
            self.json_str(tag, token);
        }
    }

    /// Adds an explicit session id.
    fn id(&mut self, id: &[u8]) {
        self.bytes(tag::ID, id);
    }

    /// The role part that opens every message (empty when absent), so that message boundaries
    /// are part of the material.
    fn role(&mut self, role: Option<&str>) {
        if !role.is_some_and(|r| self.json_str(tag::ROLE, r)) {
            self.bytes(tag::ROLE, b"");
        }
    }

    /// Inline data (base64 image, document, audio): media type, length and a digest of the
    /// data, so a large payload is hashed once, apart, and never copied.
    fn inline_data(&mut self, media_type: Option<&str>, data: &str) {
        let mut digest = Sha256::new();
        let Some(len) = feed_json_str(&mut digest, data) else {
            return;
        };
        if !media_type.is_some_and(|media| self.json_str(tag::MEDIA, media)) {
            self.bytes(tag::MEDIA, b"");
        }
        self.bytes(tag::LEN, &len.to_le_bytes());
        self.bytes(tag::DATA, &digest.finalize());
    }

    /// A URL string token: a `data:` URL is inline data, anything else a reference.
    fn url(&mut self, token: &str) {
        if let Some((media, data)) = token
            .strip_prefix("\"data:")
            .and_then(|rest| rest.split_once(','))
        {
            let media = media.strip_suffix(";base64").unwrap_or(media);
            let mut digest = Sha256::new();
            let len = data
                .as_bytes()
                .strip_suffix(b"\"")
                .and_then(|data| feed_json_text(&mut digest, data))
                .unwrap_or(u64::MAX);
            self.bytes(tag::MEDIA, media.as_bytes());
            self.bytes(tag::LEN, &len.to_le_bytes());
            self.bytes(tag::DATA, &digest.finalize());
            return;
        }
        self.json_str(tag::URL, token);
    }
}

/// Feeds the decoded text of a JSON string token (quotes included) to `hasher`; returns the
/// decoded length, or `None` when the token is not a well-formed string.
fn feed_json_str(hasher: &mut Sha256, token: &str) -> Option<u64> {
    let text = token.as_bytes().strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    feed_json_text(hasher, text)
}

/// [`feed_json_str`] on the text between the quotes. Decoding (rather than hashing the escaped
/// text) makes `"\u00fc"` and `"ü"` the same text. Short pieces between escapes are gathered
/// in a small buffer: prompts have an escape every few dozen bytes, and one hasher call per
/// piece would cost more than the hashing itself.
fn feed_json_text(hasher: &mut Sha256, text: &[u8]) -> Option<u64> {
    let mut buf = Gather {
        hasher,
        buf: [0; 512],
        len: 0,
    };
    let len = decode_json_text(text, |piece| buf.push(piece));
    buf.flush();
    len
}

/// A small write buffer in front of the hasher.
struct Gather<'h> {
    hasher: &'h mut Sha256,
    buf: [u8; 512],
    len: usize,
}

impl Gather<'_> {
    fn push(&mut self, piece: &[u8]) {
        if self.len + piece.len() > self.buf.len() {
            self.flush();
        }
        match self.buf.get_mut(self.len..self.len + piece.len()) {
            Some(dst) => {
                dst.copy_from_slice(piece);
                self.len += piece.len();
            }
            // Larger than the buffer: straight to the hasher.
            None => self.hasher.update(piece),
        }
    }

    fn flush(&mut self) {
        self.hasher
            .update(self.buf.get(..self.len).unwrap_or_default());
        self.len = 0;
    }
}

/// Streams the decoded bytes of JSON string text (between the quotes) into `sink`; returns the
/// decoded length, or `None` on a malformed escape.
fn decode_json_text(mut rest: &[u8], mut sink: impl FnMut(&[u8])) -> Option<u64> {
    let mut len = 0u64;
    loop {
        let Some(k) = memchr::memchr(b'\\', rest) else {
            sink(rest);
            return Some(len + rest.len() as u64);
        };
        let (plain, escape) = rest.split_at(k);
        sink(plain);
        len += plain.len() as u64;
        let mut utf8 = [0u8; 4];
        let (decoded, used): (&[u8], usize) = match escape.get(1)? {
            b'"' => (b"\"", 2),
            b'\\' => (b"\\", 2),
            b'/' => (b"/", 2),
            b'b' => (b"\x08", 2),
            b'f' => (b"\x0c", 2),
            b'n' => (b"\n", 2),
            b'r' => (b"\r", 2),
            b't' => (b"\t", 2),
            b'u' => {
                let hi = hex4(escape.get(2..6)?)?;
                let (code, used) = if (0xD800..0xDC00).contains(&hi) {
                    match (escape.get(6..8), escape.get(8..12).and_then(hex4)) {
                        (Some(b"\\u"), Some(lo)) if (0xDC00..0xE000).contains(&lo) => {
                            (0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00), 12)
                        }
                        _ => (0xFFFD, 6),
                    }
                } else {
                    (hi, 6)
                };
                // Lone surrogates (which serde_json lets through in raw values) become U+FFFD.
                let c = char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER);
                (c.encode_utf8(&mut utf8).as_bytes(), used)
            }
            _ => return None,
        };
        sink(decoded);
        len += decoded.len() as u64;
        rest = escape.get(used..)?;
    }
}

/// Four hex digits of a `\u` escape.
fn hex4(digits: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(digits).ok()?;
    if s.len() != 4 {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

/// The first of these headers present with a non-blank value.
fn header_id<'h>(headers: &'h http::HeaderMap, names: &[&str]) -> Option<&'h [u8]> {
    names.iter().find_map(|name| {
        let value = headers.get(*name)?.as_bytes();
        (!value.trim_ascii().is_empty()).then_some(value)
    })
}

/// A non-blank body string.
fn non_blank<'s>(value: Option<&'s Cow<'_, str>>) -> Option<&'s str> {
    value.map(|v| v.as_ref()).filter(|v| !v.trim().is_empty())
}

/// Whether `token` is the JSON string `lit` (written without escapes, as every client writes
/// roles and types).
fn is_str(token: Option<&str>, lit: &str) -> bool {
    token
        .and_then(|t| t.strip_prefix('"')?.strip_suffix('"'))
        .is_some_and(|s| s == lit)
}

/// The values of the named members of the JSON object `token`, in the order of `names`;
/// `null` counts as absent. Scanning stops once every name was found, so the members after
/// the ones needed are not even read. Small objects are read with this scanner rather than
/// serde: serde would scan every long string once more to skip it.
fn pick<'a, const N: usize>(token: &'a str, names: [&str; N]) -> [Option<&'a str>; N] {
    let mut found = [None; N];
    let mut missing = N;
    for (key, value) in json_scan::fields(token) {
        let key = json_scan::string_value(key).unwrap_or_default();
        let Some(slot) = names.iter().position(|name| *name == key) else {
            continue;
        };
        if let Some(slot @ None) = found.get_mut(slot) {
            if value != "null" {
                *slot = Some(value);
                missing -= 1;
                if missing == 0 {
                    break;
                }
            }
        }
    }
    found
}

/// Whether `token` is a JSON object.
fn is_object(token: &str) -> bool {
    token.trim_start().starts_with('{')
}

/// `role` and `content` of a message object (Anthropic, Chat, Responses input item), with its
/// `type`; `None` when the element is not an object.
fn message(token: &str) -> Option<[Option<&str>; 3]> {
    is_object(token).then(|| pick(token, ["role", "content", "type"]))
}

// ---------------------------------------------------------------------------------------------
// Anthropic Messages

/// Anthropic: header, then `metadata.user_id`, then content.
fn anthropic(m: &mut Material, input: &SessionInput<'_>, n: usize) -> bool {
    // Claude Code sends its session uuid in this header (and again in metadata.user_id).
    if let Some(id) = header_id(input.headers, &["x-claude-code-session-id"]) {
        m.id(id);
        return true;
    }
    if let Some(session) = input
        .body
        .metadata_user_id
        .as_deref()
        .and_then(user_id_session)
    {
        m.id(session.as_bytes());
        return true;
    }
    if let Some(system) = input.body.system.map(RawValue::get) {
        if system.starts_with('"') {
            if !system.starts_with(BILLING_HEADER_PREFIX) {
                m.json_str(tag::SYSTEM, system);
            }
        } else {
            for block in json_scan::elements(system) {
                let [text] = pick(block, ["text"]);
                match text {
                    Some(text) if !text.starts_with(BILLING_HEADER_PREFIX) => {
                        m.json_str(tag::SYSTEM, text);
                    }
                    _ => {}
                }
            }
        }
    }
    if let Some(messages) = input.body.messages {
        let mut taken = 0;
        for element in json_scan::elements(messages.get()) {
            if taken == n {
                break;
            }
            let Some([role, content, _]) = message(element) else {
                continue;
            };
            // Claude Code inserts `role: "system"` messages mid-conversation (agent lists,
            // reminders); they are client context, not the conversation: left out entirely.
            if is_str(role, "system") {
                continue;
            }
            taken += 1;
            m.role(role);
            if let Some(content) = content {
                anthropic_content(m, content);
            }
        }
    }
    m.parts > 0
}

/// The session id inside Claude Code's `metadata.user_id`, never the device or account part.
///
/// Two formats: legacy `user_<hex>_account_<uuid or empty>_session_<uuid>`, and newer a JSON
/// document `{"device_id":..,"account_uuid":..,"session_id":..}`. Any other value is a plain
/// user id, which would pin all of a user's conversations to one account: not a session.
fn user_id_session(user_id: &str) -> Option<Cow<'_, str>> {
    let user_id = user_id.trim();
    if is_object(user_id) {
        let [session] = pick(user_id, ["session_id"]);
        let session = json_scan::string_value(session?)?;
        return (!session.trim().is_empty()).then_some(session);
    }
    if !user_id.starts_with("user_") {
        return None;
    }
    let (_, session) = user_id.rsplit_once("_session_")?;
    (!session.is_empty()).then_some(Cow::Borrowed(session))
}

/// Text and image/document parts of an Anthropic message; tool calls, tool results and
/// thinking blocks are skipped (clients drop or rewrite thinking blocks of past turns).
fn anthropic_content(m: &mut Material, content: &str) {
    if m.json_str(tag::TEXT, content) {
        return;
    }
    for block in json_scan::elements(content) {
        let [text, source] = pick(block, ["text", "source"]);
        if let Some(text) = text {
            m.json_str(tag::TEXT, text);
        } else if let Some(source) = source {
            let [media_type, data, url, file_id] =
                pick(source, ["media_type", "data", "url", "file_id"]);
            if let Some(data) = data {
                m.inline_data(media_type, data);
            } else if let Some(url) = url {
                m.url(url);
            } else {
                m.opt_str(tag::FILE, file_id);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// OpenAI Responses

/// Responses: headers, `prompt_cache_key`, `conversation`, `instructions`, first input message.
fn responses(m: &mut Material, input: &SessionInput<'_>) -> bool {
    // Codex: `session_id` in older versions, `session-id` (with `thread-id`) in newer ones.
    let names = [
        "session_id",
        "session-id",
        "x-session-id",
        "conversation_id",
    ];
    if let Some(id) = header_id(input.headers, &names) {
        m.id(id);
        return true;
    }
    let body = input.body;
    if let Some(key) = non_blank(body.prompt_cache_key.as_ref()) {
        m.id(key.as_bytes());
        return true;
    }
    if let Some(id) = body.conversation.and_then(|c| conversation_id(c.get())) {
        if !id.trim().is_empty() {
            m.id(id.as_bytes());
            return true;
        }
    }
    // Not the input messages when instructions exist: with `previous_response_id` the input of
    // later turns holds only the new message, while the instructions repeat on every turn.
    if let Some(instructions) = non_blank(body.instructions.as_ref()) {
        m.bytes(tag::SYSTEM, instructions.as_bytes());
        return true;
    }
    let Some(items) = body.input.map(RawValue::get) else {
        return false;
    };
    if items.starts_with('"') {
        m.bytes(tag::ROLE, b"user");
        m.json_str(tag::TEXT, items);
        return true;
    }
    // Codex sends no instructions: its system prompt is input[0], a developer message.
    for element in json_scan::elements(items) {
        let Some([role, content, kind]) = message(element) else {
            continue;
        };
        if role.is_none() || !(kind.is_none() || is_str(kind, "message")) {
            continue;
        }
        m.role(role);
        if let Some(content) = content {
            openai_content(m, content);
        }
        return true;
    }
    false
}

/// Responses `conversation`: a string id or `{"id": ...}`.
fn conversation_id(token: &str) -> Option<Cow<'_, str>> {
    if token.starts_with('"') {
        return json_scan::string_value(token);
    }
    let [id] = pick(token, ["id"]);
    json_scan::string_value(id?)
}

/// Text, image, audio and file parts of a Chat message or a Responses input message.
fn openai_content(m: &mut Material, content: &str) {
    if m.json_str(tag::TEXT, content) {
        return;
    }
    for part in json_scan::elements(content) {
        // Chat nests `image_url: {url}`, `input_audio: {data, format}`, `file: {file_data |
        // file_id}`; Responses puts `image_url`, `file_data`, `file_id`, `file_url` flat.
        let [text, image_url, input_audio, file, file_data, file_id, file_url] = pick(
            part,
            [
                "text",
                "image_url",
                "input_audio",
                "file",
                "file_data",
                "file_id",
                "file_url",
            ],
        );
        if let Some(text) = text {
            m.json_str(tag::TEXT, text);
            continue;
        }
        let nested = [image_url, input_audio, file]
            .into_iter()
            .flatten()
            .find(|token| is_object(token));
        if let Some(nested) = nested {
            let [url, data, format, file_data, file_id] =
                pick(nested, ["url", "data", "format", "file_data", "file_id"]);
            if let Some(url) = url.or(file_data) {
                m.url(url);
            } else if let Some(data) = data {
                m.inline_data(format, data);
            } else {
                m.opt_str(tag::FILE, file_id);
            }
        } else if let Some(url) = image_url.or(file_data) {
            m.url(url);
        } else if let Some(url) = file_url {
            m.json_str(tag::URL, url);
        } else {
            m.opt_str(tag::FILE, file_id);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// OpenAI Chat Completions

/// Chat: headers, `prompt_cache_key`, then the leading system messages plus the first N others.
fn chat(m: &mut Material, input: &SessionInput<'_>, n: usize) -> bool {
    if let Some(id) = header_id(input.headers, &["session_id", "session-id", "x-session-id"]) {
        m.id(id);
        return true;
    }
    // OpenAI routes its prompt cache on this key: the client names the conversation (or the
    // user) on its own terms, which is what stickiness wants.
    if let Some(key) = non_blank(input.body.prompt_cache_key.as_ref()) {
        m.id(key.as_bytes());
        return true;
    }
    let Some(messages) = input.body.messages else {
        return false;
    };
    let mut leading = true;
    let mut taken = 0;
    for element in json_scan::elements(messages.get()) {
        if taken == n {
            break;
        }
        let Some([role, content, _]) = message(element) else {
            continue;
        };
        let system = is_str(role, "system") || is_str(role, "developer");
        if system && !leading {
            // A system message later in the conversation is per-turn context: skipped.
            continue;
        }
        if !system {
            leading = false;
            taken += 1;
        }
        // `developer` is what newer models call `system`; clients switch between them with the
        // model, so the conversation keeps its key whichever the turn says.
        m.role(if system { Some("\"system\"") } else { role });
        if let Some(content) = content {
            openai_content(m, content);
        }
    }
    m.parts > 0
}

// ---------------------------------------------------------------------------------------------
// Gemini

/// Gemini: header, else `systemInstruction` plus the first N `contents`.
fn gemini(m: &mut Material, input: &SessionInput<'_>, n: usize) -> bool {
    if let Some(id) = header_id(input.headers, &["x-session-id"]) {
        m.id(id);
        return true;
    }
    if let Some(system) = input.body.system_instruction.map(RawValue::get) {
        if !m.json_str(tag::SYSTEM, system) {
            let [parts] = pick(system, ["parts"]);
            if let Some(parts) = parts {
                gemini_parts(m, parts, tag::SYSTEM);
            }
        }
    }
    if let Some(contents) = input.body.contents {
        let objects = json_scan::elements(contents.get()).filter(|c| is_object(c));
        for content in objects.take(n) {
            let [role, parts] = pick(content, ["role", "parts"]);
            m.role(role);
            if let Some(parts) = parts {
                gemini_parts(m, parts, tag::TEXT);
            }
        }
    }
    m.parts > 0
}

/// Text and data parts of a Gemini content. Thought parts (the model's own reasoning) and
/// function calls are not conversation text: skipped. The REST API takes camelCase names; the
/// SDKs also send snake_case.
fn gemini_parts(m: &mut Material, parts: &str, text_tag: u8) {
    for part in json_scan::elements(parts) {
        let [text, thought, inline_camel, inline_snake, file_camel, file_snake] = pick(
            part,
            [
                "text",
                "thought",
                "inlineData",
                "inline_data",
                "fileData",
                "file_data",
            ],
        );
        if thought == Some("true") {
            continue;
        }
        if let Some(text) = text {
            m.json_str(text_tag, text);
            continue;
        }
        let Some(data) = inline_camel.or(inline_snake).or(file_camel).or(file_snake) else {
            continue;
        };
        let [mime_camel, mime_snake, bytes, uri_camel, uri_snake] = pick(
            data,
            ["mimeType", "mime_type", "data", "fileUri", "file_uri"],
        );
        if let Some(bytes) = bytes {
            m.inline_data(mime_camel.or(mime_snake), bytes);
        } else if let Some(uri) = uri_camel.or(uri_snake) {
            m.json_str(tag::URL, uri);
        }
    }
}

#[async_trait::async_trait]
impl crate::chain::RequestFilter for SessionHash {
    fn name(&self) -> &'static str {
        "session_hash"
    }

    async fn on_request(
        &self,
        ctx: &mut crate::context::RequestCtx,
        req: &crate::chain::RequestView<'_>,
    ) -> crate::chain::Flow {
        if let Some(auth) = &ctx.auth {
            ctx.session.key = self.key(ctx.protocol(), &auth.key.id, req.headers, req.parsed);
        }
        crate::chain::Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request_body::parse_request_body;
    use serde_json::{json, Value};

    const ALL: [Protocol; 4] = [
        Protocol::Anthropic,
        Protocol::OpenaiChat,
        Protocol::OpenaiResponses,
        Protocol::Gemini,
    ];

    fn header_map(pairs: &[(String, String)]) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        for (name, value) in pairs {
            let name = http::HeaderName::from_bytes(name.as_bytes()).expect("header name");
            let value = http::HeaderValue::from_str(value).expect("header value");
            map.append(name, value);
        }
        map
    }

    /// Key of a raw body with headers, content strategy.
    fn key_raw(
        protocol: Protocol,
        api_key: &str,
        headers: &[(String, String)],
        body: &[u8],
        n: usize,
    ) -> Option<String> {
        let parsed = parse_request_body(body).expect("body parses");
        let headers = header_map(headers);
        let input = SessionInput {
            protocol,
            api_key_id: api_key,
            headers: &headers,
            body: &parsed,
            message_count: n,
        };
        session_key(SessionStrategy::Content, &input)
    }

    fn key_of(protocol: Protocol, headers: &[(String, String)], body: &Value) -> String {
        let bytes = serde_json::to_vec(body).expect("serialize");
        key_raw(protocol, "key-1", headers, &bytes, 1).expect("a key")
    }

    fn key_n(protocol: Protocol, api_key: &str, body: &Value, n: usize) -> String {
        let bytes = serde_json::to_vec(body).expect("serialize");
        key_raw(protocol, api_key, &[], &bytes, n).expect("a key")
    }

    /// Turn `turn` of synthetic conversation `conv`, in the protocol's own shape, with the
    /// per-turn noise real clients add (billing header, moving cache_control, reminders).
    fn conversation(protocol: Protocol, conv: usize, turn: usize) -> Value {
        let user = |t: usize| format!("question {t} of conversation {conv}");
        let assistant = |t: usize| format!("answer {t} of conversation {conv} ünïcødé 🚀");
        match protocol {
            Protocol::Anthropic => {
                let mut messages = vec![];
                for t in 1..=turn {
                    let mut block = json!({"type": "text", "text": user(t)});
                    if t == turn {
                        block["cache_control"] = json!({"type": "ephemeral"});
                    }
                    messages.push(json!({"role": "user", "content": [block]}));
                    if t == 1 {
                        messages.push(
                            json!({"role": "system", "content": format!("agents at turn {turn}")}),
                        );
                    }
                    if t < turn {
                        messages.push(json!({"role": "assistant", "content": [{"type": "text", "text": assistant(t)}]}));
                    }
                }
                json!({
                    "model": "claude-sonnet-4-5", "max_tokens": 1024, "stream": true,
                    "system": [
                        {"type": "text", "text": format!("x-anthropic-billing-header: cc_version=2.1.{turn}; cch={turn:05};")},
                        {"type": "text", "text": "You are a careful agent.\nBe brief.", "cache_control": {"type": "ephemeral"}}
                    ],
                    "messages": messages,
                })
            }
            Protocol::OpenaiChat => {
                let mut messages = vec![json!({"role": "system", "content": "You are helpful."})];
                for t in 1..=turn {
                    messages.push(json!({"role": "user", "content": user(t)}));
                    if t < turn {
                        messages.push(json!({"role": "assistant", "content": assistant(t)}));
                        messages.push(
                            json!({"role": "system", "content": format!("note at turn {turn}")}),
                        );
                    }
                }
                json!({"model": "gpt-5", "stream": true, "messages": messages})
            }
            Protocol::OpenaiResponses => {
                let mut input = vec![];
                for t in 1..=turn {
                    input.push(json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": user(t)}]}));
                    if t < turn {
                        input.push(
                            json!({"type": "reasoning", "id": format!("rs_{t}"), "summary": []}),
                        );
                        input.push(json!({"type": "message", "role": "assistant", "id": format!("msg_{t}"), "content": [{"type": "output_text", "text": assistant(t), "annotations": []}]}));
                    }
                }
                json!({"model": "gpt-5", "stream": true, "store": false, "input": input})
            }
            Protocol::Gemini => {
                let mut contents = vec![];
                for t in 1..=turn {
                    contents.push(json!({"role": "user", "parts": [{"text": user(t)}]}));
                    if t < turn {
                        contents.push(json!({"role": "model", "parts": [{"text": "thinking...", "thought": true}, {"text": assistant(t)}]}));
                    }
                }
                json!({"systemInstruction": {"parts": [{"text": "You are helpful."}]}, "contents": contents})
            }
        }
    }

    #[test]
    fn a_content_key_is_the_same_text_in_every_version() {
        // Bindings stored in Redis outlive an upgrade: the key of a request must not change.
        let body =
            br#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"hello"}]}"#;
        let key = key_raw(Protocol::Anthropic, "key-1", &[], body, 1).expect("a key");
        assert_eq!(key, "key-1:anthropic:26c9f7988588d42d");
    }

    #[test]
    fn content_key_is_turn_stable_and_scoped() {
        for protocol in ALL {
            let turn1 = key_n(protocol, "key-1", &conversation(protocol, 0, 1), 1);
            for turn in [2, 5] {
                let later = key_n(protocol, "key-1", &conversation(protocol, 0, turn), 1);
                assert_eq!(turn1, later, "{protocol:?} turn {turn}");
            }
            // N = 2: stable once the conversation has two messages.
            let two = key_n(protocol, "key-1", &conversation(protocol, 0, 2), 2);
            assert_eq!(
                two,
                key_n(protocol, "key-1", &conversation(protocol, 0, 5), 2)
            );

            let other = key_n(protocol, "key-1", &conversation(protocol, 1, 1), 1);
            assert_ne!(turn1, other, "{protocol:?}: two conversations");
            let other_key = key_n(protocol, "key-2", &conversation(protocol, 0, 1), 1);
            assert_ne!(turn1, other_key, "{protocol:?}: two api keys");

            let prefix = format!("key-1:{}:", protocol.as_str());
            let digest = turn1.strip_prefix(&prefix).expect("key prefix");
            assert_eq!(digest.len(), 16);
            assert!(digest.bytes().all(|c| c.is_ascii_hexdigit()));
        }
    }

    /// One identity source: a header, or a body edit.
    enum Source {
        Header(&'static str, &'static str),
        Body(&'static str, Value),
    }

    fn request(base: &Value, sources: &[Source]) -> (Vec<(String, String)>, Value) {
        let mut headers = vec![];
        let mut body = base.clone();
        for source in sources {
            match source {
                Source::Header(name, value) => headers.push((name.to_string(), value.to_string())),
                Source::Body(field, value) => body[*field] = value.clone(),
            }
        }
        (headers, body)
    }

    #[test]
    fn identity_sources_win_in_order() {
        use Source::{Body, Header};
        let cc_user = |session: &str| json!({"user_id": format!(r#"{{"device_id":"dev-1","account_uuid":"","session_id":"{session}"}}"#)});
        let table: Vec<(Protocol, Vec<Source>)> = vec![
            (
                Protocol::Anthropic,
                vec![
                    Header("x-claude-code-session-id", "hdr-session"),
                    Body("metadata", cc_user("meta-session")),
                ],
            ),
            (
                Protocol::OpenaiResponses,
                vec![
                    Header("session_id", "h1"),
                    Header("session-id", "h2"),
                    Header("x-session-id", "h3"),
                    Header("conversation_id", "h4"),
                    Body("prompt_cache_key", json!("pck")),
                    Body("conversation", json!({"id": "conv_1"})),
                    Body("instructions", json!("Be terse.")),
                ],
            ),
            (
                Protocol::OpenaiChat,
                vec![
                    Header("session_id", "h1"),
                    Header("session-id", "h2"),
                    Header("x-session-id", "h3"),
                    Body("prompt_cache_key", json!("pck")),
                ],
            ),
            (Protocol::Gemini, vec![Header("x-session-id", "h1")]),
        ];
        for (protocol, sources) in table {
            let base = conversation(protocol, 0, 2);
            let content = key_of(protocol, &[], &base);
            let mut previous = None;
            for i in 0..sources.len() {
                let (h, b) = request(&base, &sources[i..]);
                let all_from_i = key_of(protocol, &h, &b);
                let (h, b) = request(&base, &sources[i..=i]);
                assert_eq!(
                    all_from_i,
                    key_of(protocol, &h, &b),
                    "{protocol:?} source {i}"
                );
                assert_ne!(all_from_i, content, "{protocol:?} source {i} vs content");
                assert_ne!(
                    Some(&all_from_i),
                    previous.as_ref(),
                    "{protocol:?} source {i}"
                );
                previous = Some(all_from_i);
            }
        }
    }

    #[test]
    fn explicit_ids_hash_alike_whatever_carries_them() {
        let base = conversation(Protocol::Anthropic, 0, 1);
        let header = vec![("x-claude-code-session-id".to_string(), "s-1".to_string())];
        let mut json_meta = base.clone();
        json_meta["metadata"] =
            json!({"user_id": r#"{"device_id":"d","account_uuid":"a","session_id":"s-1"}"#});
        let mut legacy = base.clone();
        legacy["metadata"] = json!({"user_id": "user_0123abcd_account__session_s-1"});
        let by_header = key_of(Protocol::Anthropic, &header, &base);
        assert_eq!(by_header, key_of(Protocol::Anthropic, &[], &json_meta));
        assert_eq!(by_header, key_of(Protocol::Anthropic, &[], &legacy));

        let base = conversation(Protocol::OpenaiResponses, 0, 1);
        let header = vec![("session-id".to_string(), "thread-1".to_string())];
        let mut by_body = base.clone();
        by_body["prompt_cache_key"] = json!("thread-1");
        let mut by_conv = base.clone();
        by_conv["conversation"] = json!("thread-1");
        let by_header = key_of(Protocol::OpenaiResponses, &header, &base);
        assert_eq!(by_header, key_of(Protocol::OpenaiResponses, &[], &by_body));
        assert_eq!(by_header, key_of(Protocol::OpenaiResponses, &[], &by_conv));

        // Blank headers count as absent.
        let blank = vec![("session-id".to_string(), " ".to_string())];
        assert_eq!(
            key_of(Protocol::OpenaiResponses, &blank, &base),
            key_of(Protocol::OpenaiResponses, &[], &base)
        );
    }

    #[test]
    fn user_id_session_part() {
        let cases: &[(&str, Option<&str>)] = &[
            (
                "user_5f3a9c_account_1b2c3d4e-0000-4000-8000-000000000001_session_9e8d7c6b-1111-4111-8111-000000000002",
                Some("9e8d7c6b-1111-4111-8111-000000000002"),
            ),
            ("user_5f3a9c_account__session_abc", Some("abc")),
            (
                r#"{"device_id":"c1dd","account_uuid":"","session_id":"b323"}"#,
                Some("b323"),
            ),
            (r#" {"session_id":"x\"y"} "#, Some("x\"y")),
            (r#"{"device_id":"c1dd","account_uuid":"a"}"#, None),
            (r#"{"device_id":"c1dd","session_id":""}"#, None),
            (r#"{"session_id":5}"#, None),
            ("{not json", None),
            ("user_5f3a9c_account_abc", None),
            ("user_5f3a9c_account_abc_session_", None),
            ("customer-42", None),
            ("", None),
        ];
        for (user_id, want) in cases {
            assert_eq!(user_id_session(user_id).as_deref(), *want, "{user_id}");
        }
    }

    #[test]
    fn per_machine_and_per_turn_details_do_not_change_the_key() {
        let base = conversation(Protocol::Anthropic, 0, 1);
        let key = key_of(Protocol::Anthropic, &[], &base);
        let with_meta = |user_id: &str| {
            let mut b = base.clone();
            b["metadata"] = json!({ "user_id": user_id });
            b
        };
        // Same session, other device or account: same key.
        let a = with_meta(r#"{"device_id":"dev-a","account_uuid":"","session_id":"s"}"#);
        let b = with_meta(r#"{"device_id":"dev-b","account_uuid":"acc","session_id":"s"}"#);
        assert_eq!(
            key_of(Protocol::Anthropic, &[], &a),
            key_of(Protocol::Anthropic, &[], &b)
        );
        let a = with_meta("user_aaaa_account_x_session_s");
        let b = with_meta("user_bbbb_account__session_s");
        assert_eq!(
            key_of(Protocol::Anthropic, &[], &a),
            key_of(Protocol::Anthropic, &[], &b)
        );
        // No session part: the device id is never used, the content decides.
        let a = with_meta(r#"{"device_id":"dev-a","account_uuid":""}"#);
        assert_eq!(key_of(Protocol::Anthropic, &[], &a), key);

        // User agent, stainless and request ids are not material.
        let noise: Vec<(String, String)> = [
            ("user-agent", "claude-cli/2.1.197"),
            ("x-stainless-os", "Linux"),
            ("x-request-id", "req-1"),
            ("x-client-request-id", "req-2"),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
        assert_eq!(key_of(Protocol::Anthropic, &noise, &base), key);

        // Billing header block and cache_control: not material. Other system text: material.
        let mut b = base.clone();
        b["system"][0]["text"] = json!("x-anthropic-billing-header: cc_version=9.9.9; cch=00001;");
        b["system"][1]["cache_control"] = Value::Null;
        b["messages"][0]["content"][0]["cache_control"] = json!({"type": "ephemeral", "ttl": "1h"});
        assert_eq!(key_of(Protocol::Anthropic, &[], &b), key);
        b["system"][1]["text"] = json!("You are another agent.");
        assert_ne!(key_of(Protocol::Anthropic, &[], &b), key);

        // Chat: a client that calls its system message `developer` for a reasoning model keeps
        // the conversation's key; the text still counts.
        let chat = |role: &str, text: &str| {
            json!({"model": "gpt-5", "messages": [
                {"role": role, "content": text},
                {"role": "user", "content": "hello"},
            ]})
        };
        let key = key_of(Protocol::OpenaiChat, &[], &chat("system", "Be brief."));
        assert_eq!(
            key_of(Protocol::OpenaiChat, &[], &chat("developer", "Be brief.")),
            key
        );
        assert_ne!(
            key_of(Protocol::OpenaiChat, &[], &chat("developer", "Be long.")),
            key
        );
    }

    #[test]
    fn content_normalisation_and_framing() {
        let k =
            |protocol, body: &str| key_raw(protocol, "k", &[], body.as_bytes(), 1).expect("a key");
        let same: &[(Protocol, &str, &str)] = &[
            (
                Protocol::Anthropic,
                r#"{"messages":[{"role":"user","content":"hi"}]}"#,
                r#"{"messages":[{"role":"user","content":[{"type":"text","text":"hi","cache_control":{"type":"ephemeral"}}]}]}"#,
            ),
            (
                Protocol::Anthropic,
                r#"{"system":"S","messages":[{"role":"user","content":"ü\n"}]}"#,
                r#"{"system":[{"type":"text","text":"S"}],"messages":[{"role":"user","content":"\u00fc\u000a"}]}"#,
            ),
            (
                Protocol::Anthropic,
                r#"{"messages":[{"role":"user","content":[{"type":"image","source":{"type":"base64","media_type":"image/png","data":"ab/cd"}}]}]}"#,
                r#"{"messages":[{"role":"user","content":[{"type":"image","source":{"type":"base64","media_type":"image/png","data":"ab\/cd"}}]}]}"#,
            ),
            (
                Protocol::OpenaiChat,
                r#"{"messages":[{"role":"user","content":"hi"}]}"#,
                r#"{"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#,
            ),
            (
                Protocol::OpenaiResponses,
                r#"{"input":"hi"}"#,
                r#"{"input":[{"role":"user","content":[{"type":"input_text","text":"hi"}]}]}"#,
            ),
            (
                Protocol::Gemini,
                r#"{"contents":[{"role":"user","parts":[{"inlineData":{"mimeType":"image/png","data":"QUJD"}}]}]}"#,
                r#"{"contents":[{"role":"user","parts":[{"inline_data":{"mime_type":"image/png","data":"QUJD"}}]}]}"#,
            ),
            (
                Protocol::OpenaiChat,
                r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,QUJD","detail":"low"}}]}]}"#,
                r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,QUJD","detail":"high"}}]}]}"#,
            ),
        ];
        for (protocol, a, b) in same {
            assert_eq!(k(*protocol, a), k(*protocol, b), "{a} vs {b}");
        }
        let different: &[(Protocol, &str, &str)] = &[
            (
                Protocol::Anthropic,
                r#"{"system":[{"type":"text","text":"ab"},{"type":"text","text":"c"}],"messages":[]}"#,
                r#"{"system":[{"type":"text","text":"a"},{"type":"text","text":"bc"}],"messages":[]}"#,
            ),
            (
                Protocol::Anthropic,
                r#"{"messages":[{"role":"user","content":"hi"}]}"#,
                r#"{"messages":[{"role":"assistant","content":"hi"}]}"#,
            ),
            (
                Protocol::Anthropic,
                r#"{"system":"hi","messages":[]}"#,
                r#"{"messages":[{"role":"user","content":"hi"}]}"#,
            ),
            (
                Protocol::Anthropic,
                r#"{"messages":[{"role":"user","content":[{"type":"image","source":{"type":"base64","media_type":"image/png","data":"QUJD"}}]}]}"#,
                r#"{"messages":[{"role":"user","content":[{"type":"image","source":{"type":"base64","media_type":"image/png","data":"QUJE"}}]}]}"#,
            ),
            (
                Protocol::Anthropic,
                r#"{"messages":[{"role":"user","content":[{"type":"image","source":{"type":"base64","media_type":"image/png","data":"QUJD"}}]}]}"#,
                r#"{"messages":[{"role":"user","content":[{"type":"image","source":{"type":"base64","media_type":"image/jpeg","data":"QUJD"}}]}]}"#,
            ),
            (
                Protocol::OpenaiChat,
                r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://a.example/1.png"}}]}]}"#,
                r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://a.example/2.png"}}]}]}"#,
            ),
            (
                Protocol::OpenaiResponses,
                r#"{"instructions":"A","input":"x"}"#,
                r#"{"instructions":"B","input":"x"}"#,
            ),
            (
                Protocol::Gemini,
                r#"{"systemInstruction":{"parts":[{"text":"A"}]},"contents":[]}"#,
                r#"{"systemInstruction":{"parts":[{"text":"B"}]},"contents":[]}"#,
            ),
        ];
        for (protocol, a, b) in different {
            assert_ne!(k(*protocol, a), k(*protocol, b), "{a} vs {b}");
        }
        // Instructions win over input; Codex-style developer input[0] when there are none.
        assert_eq!(
            k(
                Protocol::OpenaiResponses,
                r#"{"instructions":"A","input":"x"}"#
            ),
            k(
                Protocol::OpenaiResponses,
                r#"{"instructions":"A","input":"y"}"#
            )
        );
        assert_eq!(
            k(
                Protocol::OpenaiResponses,
                r#"{"input":[{"type":"message","role":"developer","content":[{"type":"input_text","text":"sys"}]},{"role":"user","content":"a"}]}"#
            ),
            k(
                Protocol::OpenaiResponses,
                r#"{"input":[{"type":"message","id":"msg_2","role":"developer","content":[{"type":"input_text","text":"sys"}]},{"role":"user","content":"b"}]}"#
            )
        );
    }

    #[test]
    fn strategies() {
        let body = serde_json::to_vec(&conversation(Protocol::Anthropic, 0, 1)).expect("body");
        let parsed = parse_request_body(&body).expect("parses");
        let headers = http::HeaderMap::new();
        let input = SessionInput::new(Protocol::Anthropic, "key-7", &headers, &parsed);
        assert_eq!(input.message_count, 1);
        assert_eq!(
            session_key(SessionStrategy::ApiKey, &input).as_deref(),
            Some("apikey:key-7:anthropic")
        );
        // Per protocol: a key used by Claude Code and by Codex binds each to its own account.
        let chat = SessionInput::new(Protocol::OpenaiChat, "key-7", &headers, &parsed);
        assert_eq!(
            session_key(SessionStrategy::ApiKey, &chat).as_deref(),
            Some("apikey:key-7:openai_chat")
        );
        assert_eq!(session_key(SessionStrategy::None, &input), None);
        let content = session_key(SessionStrategy::Content, &input);
        assert!(content.is_some());
        let filter = SessionHash::new(SessionStrategy::Content, 0);
        assert_eq!(filter.strategy(), SessionStrategy::Content);
        assert_eq!(
            filter.key(Protocol::Anthropic, "key-7", &headers, &parsed),
            content
        );

        // Config names.
        let parsed: Vec<SessionStrategy> =
            serde_json::from_str(r#"["content","api_key","none"]"#).expect("names");
        assert_eq!(
            parsed,
            [
                SessionStrategy::Content,
                SessionStrategy::ApiKey,
                SessionStrategy::None
            ]
        );
        assert_eq!(SessionStrategy::default(), SessionStrategy::Content);
    }

    #[test]
    fn no_material_gives_no_key() {
        for protocol in ALL {
            for body in [r#"{}"#, r#"{"messages":[],"input":[],"contents":[]}"#] {
                assert_eq!(
                    key_raw(protocol, "k", &[], body.as_bytes(), 1),
                    None,
                    "{protocol:?} {body}"
                );
            }
        }
    }

    #[test]
    fn odd_shapes_never_panic() {
        let bodies = [
            r#"{"messages":"x","input":5,"contents":"y","system":5,"systemInstruction":[]}"#,
            r#"{"messages":[1,null,"s",[],{"role":1,"content":5},{"role":"user","content":{"a":1}}]}"#,
            r#"{"system":[1,{"text":3},{"type":"image","source":"x"},{"source":{"data":7}}]}"#,
            r#"{"input":[{"type":"message"},{"role":null},{"role":"user","content":[{"image_url":5},{"file":{"file_id":"f"}},{"input_audio":{"data":"QQ==","format":"wav"}},{"file_data":"data:application/pdf;base64,QQ=="},{"file_url":"https://x"},{"file_id":"f2"}]}]}"#,
            r#"{"conversation":5,"input":{}}"#,
            r#"{"conversation":{"id":null},"input":[[]]}"#,
            r#"{"contents":{"parts":"x"},"systemInstruction":"sys"}"#,
            r#"{"contents":[{"parts":[{"fileData":{"fileUri":"gs://b/f"}},{"inlineData":{"data":5}},{"inlineData":"x"}]}]}"#,
            r#"{"messages":[{"role":"user","content":[{"type":"image","source":{"type":"base64","media_type":"image/png","data":"\ud800x\udc00"}}]}]}"#,
            r#"{"messages":[{"role":"user","content":[{"type":"image","source":{"type":"url","url":"data:image/png;base64"}}]}]}"#,
            r#"{"messages":[{"role":"user","content":[{"type":"document","source":{"type":"file","file_id":"file_1"}}]}]}"#,
            r#"{"metadata":{"user_id":"{\"session_id\":{}}"},"messages":[{"role":"system","content":"only system"}]}"#,
        ];
        for protocol in ALL {
            for body in bodies {
                for n in [0, 1, 3] {
                    let _ = key_raw(protocol, "k", &[], body.as_bytes(), n);
                }
            }
        }
    }

    /// Decoded bytes of a JSON string token, through the streaming decoder.
    fn decode(token: &str) -> Option<Vec<u8>> {
        let text = token.as_bytes().strip_prefix(b"\"")?.strip_suffix(b"\"")?;
        let mut out = Vec::new();
        let len = decode_json_text(text, |piece| out.extend_from_slice(piece))?;
        assert_eq!(len, out.len() as u64);
        Some(out)
    }

    #[test]
    fn decoding_matches_serde() {
        let long = format!("\"{}\"", "ab\\ncd\\\"e ".repeat(300));
        let cases = [
            r#""""#,
            r#""plain""#,
            r#""a\nb\t\"c\"\\d\/e\bf\fg\rh""#,
            r#""\u00fc\u65e5\ud83d\ude80 end""#,
            r#""\ud83d\ude80\ud83d\ude80""#,
            "\"ünïcødé ✓ 日本語 🚀\"",
            long.as_str(),
        ];
        for token in cases {
            let want: String = serde_json::from_str(token).expect("serde");
            assert_eq!(decode(token).as_deref(), Some(want.as_bytes()), "{token}");
            // Through the gathering buffer into a hasher: the same digest as the plain text.
            let mut hasher = Sha256::new();
            assert_eq!(feed_json_str(&mut hasher, token), Some(want.len() as u64));
            assert_eq!(hasher.finalize(), Sha256::digest(want.as_bytes()));
        }
        assert_eq!(
            decode(r#""\ud800x""#).as_deref(),
            Some("\u{fffd}x".as_bytes())
        );
        for bad in ["", "\"", "x", r#""\q""#, r#""\u12""#, r#""\""#] {
            assert_eq!(decode(bad), None, "{bad}");
        }
    }

    /// One capture of `tests/fixtures/client-requests`.
    struct Capture {
        protocol: Protocol,
        headers: Vec<(String, String)>,
        body: Value,
    }

    fn capture(text: &str) -> Capture {
        let v: Value = serde_json::from_str(text).expect("capture");
        let path = v["path"].as_str().expect("path");
        let protocol = if path.ends_with("/messages") {
            Protocol::Anthropic
        } else if path.ends_with("/chat/completions") {
            Protocol::OpenaiChat
        } else if path.ends_with("/responses") {
            Protocol::OpenaiResponses
        } else {
            Protocol::Gemini
        };
        let headers = v["headers"]
            .as_object()
            .expect("headers")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().expect("header value").to_string()))
            .collect();
        Capture {
            protocol,
            headers,
            body: v["body"].clone(),
        }
    }

    fn fixtures() -> Vec<(&'static str, Capture, Capture)> {
        macro_rules! client {
            ($name:literal) => {
                (
                    $name,
                    capture(include_str!(concat!(
                        "../../tests/fixtures/client-requests/",
                        $name,
                        ".turn1.json"
                    ))),
                    capture(include_str!(concat!(
                        "../../tests/fixtures/client-requests/",
                        $name,
                        ".turn2.json"
                    ))),
                )
            };
        }
        vec![
            client!("claude-code"),
            client!("codex-cli"),
            client!("codex-cli-root-base-url"),
            client!("sdk-anthropic"),
            client!("sdk-openai-chat"),
            client!("sdk-openai-responses"),
            client!("sdk-gemini"),
        ]
    }

    fn capture_key(c: &Capture) -> String {
        key_of(c.protocol, &c.headers, &c.body)
    }

    #[test]
    fn real_clients_keep_their_key_across_turns() {
        let mut keys = Vec::new();
        for (name, turn1, turn2) in fixtures() {
            let key = capture_key(&turn1);
            assert_eq!(key, capture_key(&turn2), "{name}");
            assert!(!keys.contains(&key), "{name} shares a key");
            keys.push(key);
        }
    }

    #[test]
    fn real_clients_fall_back_consistently() {
        let without = |c: &Capture, headers: &[&str], fields: &[&str]| {
            let headers: Vec<(String, String)> = c
                .headers
                .iter()
                .filter(|(k, _)| !headers.contains(&k.as_str()))
                .cloned()
                .collect();
            let mut body = c.body.clone();
            if let Some(obj) = body.as_object_mut() {
                for f in fields {
                    obj.remove(*f);
                }
            }
            key_of(c.protocol, &headers, &body)
        };
        for (name, turn1, turn2) in fixtures() {
            match name {
                // The session uuid is in the header and in metadata.user_id: either gives the key.
                "claude-code" => {
                    let key = capture_key(&turn1);
                    assert_eq!(key, without(&turn1, &["x-claude-code-session-id"], &[]));
                    // Messages alone (with the mid-conversation system message): turn-stable.
                    // (Claude Code's system prompt itself differs between these two captures.)
                    let hdr = ["x-claude-code-session-id"];
                    let fields = ["metadata", "system"];
                    assert_eq!(
                        without(&turn1, &hdr, &fields),
                        without(&turn2, &hdr, &fields)
                    );
                    assert_ne!(without(&turn1, &hdr, &fields), key);
                }
                // Codex: the `session-id` header equals prompt_cache_key; without both, the
                // developer message input[0] keys the session.
                "codex-cli" | "codex-cli-root-base-url" => {
                    let key = capture_key(&turn1);
                    assert_eq!(key, without(&turn1, &["session-id"], &[]));
                    let fields = ["prompt_cache_key"];
                    let content = without(&turn1, &["session-id"], &fields);
                    assert_ne!(content, key);
                    assert_eq!(content, without(&turn2, &["session-id"], &fields));
                }
                "sdk-openai-chat" | "sdk-openai-responses" => {
                    let fields = ["prompt_cache_key"];
                    assert_eq!(without(&turn1, &[], &fields), without(&turn2, &[], &fields));
                }
                _ => {}
            }
        }
    }
}
