//! Inputs shared by the criterion benchmarks: the recorded client requests and upstream streams
//! of `tests/fixtures/`, grown back to the sizes real clients and upstreams send.
//!
//! The captures shorten long strings to `...<N chars>` (see `tests/fixtures/client-requests/
//! README.md`); hashing and parsing costs depend on size, so those markers are expanded into N
//! characters of prompt-like text (with newlines and quotes, which JSON must escape).

#![allow(dead_code)] // each bench uses a different part

pub mod answer;

use std::path::PathBuf;

use relay_filters::Protocol;
use serde_json::Value;

/// Bytes of a file under `tests/fixtures/`.
pub fn fixture(rel: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A client request: headers as sent, query and the JSON body (compact, as clients send it).
#[derive(Clone)]
pub struct ClientRequest {
    pub headers: http::HeaderMap,
    pub query: Option<String>,
    pub body: Vec<u8>,
}

/// `n` characters of text that reads like a prompt: words, newlines and quotes.
pub fn filler(n: usize) -> String {
    const TEXT: &str = "Read the file before you edit it, and say \"why\" in one line.\n\
        Prefer the smallest change that fixes the cause; run the tests after it.\n\
        - Never guess a path: list the directory first.\n";
    TEXT.chars().cycle().take(n).collect()
}

/// Replaces every `...<N chars>` marker in `s` with `N` characters of [`filler`].
fn expand_marker(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("...<") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 4..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        match (
            after[..digits].parse::<usize>(),
            after[digits..].strip_prefix(" chars>"),
        ) {
            (Ok(n), Some(tail)) => {
                out.push_str(&filler(n));
                rest = tail;
            }
            _ => {
                out.push_str("...<");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn expand(v: &mut Value) {
    match v {
        Value::String(s) if s.contains("...<") => *s = expand_marker(s),
        Value::Array(a) => a.iter_mut().for_each(expand),
        Value::Object(o) => o.values_mut().for_each(expand),
        _ => {}
    }
}

/// Loads `client-requests/{name}.json` with its shortened strings expanded.
pub fn capture(name: &str) -> (http::HeaderMap, Option<String>, Value) {
    let raw = fixture(&format!("client-requests/{name}.json"));
    let mut doc: Value = serde_json::from_slice(&raw).expect("capture is JSON");
    let mut headers = http::HeaderMap::new();
    if let Some(h) = doc["headers"].as_object() {
        for (k, v) in h {
            let (Ok(name), Some(Ok(value))) = (
                http::HeaderName::from_bytes(k.as_bytes()),
                v.as_str().map(http::HeaderValue::from_str),
            ) else {
                continue;
            };
            headers.insert(name, value);
        }
    }
    let query = doc["query"].as_object().and_then(|q| {
        let pairs: Vec<String> = q
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
            .collect();
        (!pairs.is_empty()).then(|| pairs.join("&"))
    });
    let mut body = doc["body"].take();
    expand(&mut body);
    (headers, query, body)
}

fn size(v: &Value) -> usize {
    serde_json::to_vec(v).map(|b| b.len()).unwrap_or(0)
}

/// Claude Code turn 2 at `target` bytes: tools dropped from the end while too large, then the
/// last user message grown to the size. `explicit_id = false` removes the session id header and
/// `metadata`, so the key comes from the system prompt and first message (the SDK case).
pub fn anthropic_request(target: usize, explicit_id: bool) -> ClientRequest {
    let (mut headers, query, mut body) = capture("claude-code.turn2");
    if !explicit_id {
        headers.remove("x-claude-code-session-id");
        if let Some(o) = body.as_object_mut() {
            o.remove("metadata");
        }
    }
    while size(&body) > target {
        let Some(tools) = body["tools"].as_array_mut().filter(|t| !t.is_empty()) else {
            break;
        };
        tools.pop();
    }
    if let Some(msgs) = body["messages"].as_array_mut() {
        msgs.push(serde_json::json!({"role": "assistant", "content": "ok"}));
        msgs.push(serde_json::json!({"role": "user", "content": [{"type": "text", "text": ""}]}));
    }
    grow_to(&mut body, target, |b, text| {
        if let Some(last) = b["messages"].as_array_mut().and_then(|m| m.last_mut()) {
            last["content"][0]["text"] = Value::String(text);
        }
    });
    finish(headers, query, body)
}

/// Codex CLI turn 2 grown to `target` bytes with the history of a long task (tool calls, their
/// outputs and assistant messages appended to `input`). `explicit_id = false` removes the
/// session headers and `prompt_cache_key`, so the key comes from the first `input` message.
pub fn codex_request(target: usize, explicit_id: bool) -> ClientRequest {
    let (mut headers, query, mut body) = capture("codex-cli.turn2");
    if !explicit_id {
        for h in [
            "session_id",
            "session-id",
            "x-session-id",
            "conversation_id",
        ] {
            headers.remove(h);
        }
        if let Some(o) = body.as_object_mut() {
            o.remove("prompt_cache_key");
        }
    }
    let mut n = 0;
    while size(&body) < target {
        n += 1;
        let left = target - size(&body);
        let item = match n % 3 {
            0 => serde_json::json!({"type": "message", "role": "assistant",
                "content": [{"type": "output_text", "text": filler(left.min(1500))}]}),
            1 => serde_json::json!({"type": "function_call", "name": "shell",
                "call_id": format!("call_{n:04}"), "arguments": "{\"command\":[\"bash\",\"-lc\",\"rg -n usage filters/src\"]}"}),
            _ => {
                serde_json::json!({"type": "function_call_output", "call_id": format!("call_{n:04}"),
                "output": filler(left.min(6000))})
            }
        };
        match body["input"].as_array_mut() {
            Some(input) => input.push(item),
            None => break,
        }
    }
    finish(headers, query, body)
}

/// A small Anthropic SDK-style request of about `target` bytes, no session id: what the load
/// test sends.
pub fn sdk_anthropic_request(target: usize, stream: bool) -> ClientRequest {
    let mut body = serde_json::json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "stream": stream,
        "system": "You are a careful assistant for software engineers.",
        "messages": [{"role": "user", "content": ""}],
    });
    grow_to(&mut body, target, |b, text| {
        b["messages"][0]["content"] = Value::String(text)
    });
    let mut headers = http::HeaderMap::new();
    for (k, v) in [
        ("content-type", "application/json"),
        ("anthropic-version", "2023-06-01"),
        ("user-agent", "Anthropic/Python 2.12.0"),
        ("accept", "application/json"),
    ] {
        headers.insert(k, http::HeaderValue::from_static(v));
    }
    finish(headers, None, body)
}

/// Sets a filler text through `set` so that the body serializes to about `target` bytes
/// (escapes make the JSON longer than the text: a few rounds settle it).
fn grow_to(body: &mut Value, target: usize, set: impl Fn(&mut Value, String)) {
    let mut len = 0usize;
    set(body, String::new());
    for _ in 0..6 {
        let now = size(body);
        let next = (len + target).saturating_sub(now);
        if now == target || next == len {
            break;
        }
        len = next;
        set(body, filler(len));
    }
}

fn finish(mut headers: http::HeaderMap, query: Option<String>, body: Value) -> ClientRequest {
    let body = serde_json::to_vec(&body).expect("serialize body");
    headers.insert(
        http::header::CONTENT_LENGTH,
        http::HeaderValue::from(body.len()),
    );
    ClientRequest {
        headers,
        query,
        body,
    }
}

/// Tells the events of a stream that carry content (repeated to grow the stream).
type DeltaTest = fn(&[u8]) -> bool;

/// The recorded stream of `protocol`, its delta events repeated until it is at least `target`
/// bytes: the shape of a long answer (start events, many deltas, the usage at the end).
pub fn long_stream(protocol: Protocol, target: usize) -> Vec<u8> {
    let (file, sep, is_delta): (&str, &[u8], DeltaTest) = match protocol {
        Protocol::Anthropic => ("anthropic.stream.sse", b"\n\n", |e| {
            contains(e, b"content_block_delta")
        }),
        Protocol::OpenaiChat => ("openai-chat.stream.sse", b"\n\n", |e| {
            contains(e, b"\"delta\":{\"content\"")
        }),
        Protocol::OpenaiResponses => ("openai-responses.stream.sse", b"\n\n", |e| {
            contains(e, b"response.output_text.delta")
        }),
        Protocol::Gemini => ("gemini.stream.sse", b"\r\n\r\n", |e| {
            !contains(e, b"finishReason")
        }),
    };
    let raw = fixture(&format!("streams/{file}"));
    let events = split_events(&raw, sep);
    let deltas: Vec<&[u8]> = events.iter().copied().filter(|e| is_delta(e)).collect();
    let last_delta = events
        .iter()
        .rposition(|e| is_delta(e))
        .expect("stream has delta events");
    let mut out = Vec::with_capacity(target + raw.len());
    for e in &events[..=last_delta] {
        out.extend_from_slice(e);
    }
    let tail_len: usize = events[last_delta + 1..].iter().map(|e| e.len()).sum();
    for e in deltas.iter().cycle() {
        if out.len() + tail_len >= target {
            break;
        }
        out.extend_from_slice(e);
    }
    for e in &events[last_delta + 1..] {
        out.extend_from_slice(e);
    }
    out
}

/// Events of an SSE body, each with its terminating blank line.
fn split_events<'a>(raw: &'a [u8], sep: &[u8]) -> Vec<&'a [u8]> {
    let mut events = Vec::new();
    let mut start = 0;
    while let Some(i) = find(&raw[start..], sep) {
        let end = start + i + sep.len();
        events.push(&raw[start..end]);
        start = end;
    }
    if start < raw.len() {
        events.push(&raw[start..]);
    }
    events
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle).is_some()
}

/// Pepper of the benchmark key caches.
pub const PEPPER: &[u8] = b"bench-pepper-0123456789abcdef0123456789abcdef";

/// The relay's own key cache holding `n` keys; returns it with the plaintext keys.
pub fn key_cache(n: usize) -> (std::sync::Arc<llm_relay::cache::KeyCache>, Vec<String>) {
    use llm_relay::store::{ActiveApiKey, ApiKey};
    let cache = llm_relay::cache::KeyCache::new(PEPPER.to_vec());
    let mut plain = Vec::with_capacity(n);
    let mut rows = Vec::with_capacity(n);
    for i in 0..n {
        let key = llm_relay::secrets::generate_api_key();
        rows.push(ActiveApiKey {
            key: ApiKey {
                id: format!("0199a3c2-7d1e-7c4a-9f3b-{i:012}"),
                user_id: format!("user-{}", i % 100),
                username: format!("user{}", i % 100),
                name: format!("key {i}"),
                key_hash: llm_relay::secrets::api_key_hash(PEPPER, &key),
                key_prefix: key.chars().take(12).collect(),
                enabled: true,
                disabled_by_admin: false,
                expires_at: None,
                allowed_platforms: Vec::new(),
                allowed_models: Vec::new(),
                rpm_limit: None,
                max_concurrency: None,
                daily_cost_limit: None,
                monthly_cost_limit: None,
                total_cost_limit: None,
                created_at: 0,
                updated_at: 0,
                last_used_at: None,
            },
            user_enabled: true,
            user_price_rate: 10_000,
            user_daily_cost_limit: None,
            user_monthly_cost_limit: None,
            user_total_cost_limit: None,
            user_allowed_platforms: Vec::new(),
            user_allowed_models: Vec::new(),
        });
        plain.push(key);
    }
    cache.replace(rows);
    (std::sync::Arc::new(cache), plain)
}
