//! The Anthropic answers the load mock sends and the chain benchmark meters: one JSON message,
//! or an SSE stream of a given number of events (message_start, content block, ping, text
//! deltas, message_delta, message_stop), in the wire format of `tests/fixtures/streams/`.

#![allow(dead_code)] // the load mock and the benches each use a part

/// Model the answers report (priced in `conf/pricing.toml` through its dated alias).
pub const MODEL: &str = "claude-sonnet-4-5-20250929";

/// A non-streamed Messages answer.
pub fn anthropic_json() -> Vec<u8> {
    format!(
        concat!(
            r#"{{"id":"msg_01LoadMockJson0000000000","type":"message","role":"assistant","model":"{}","#,
            r#""content":[{{"type":"text","text":"The relay forwards this answer unchanged; only the usage is read."}}],"#,
            r#""stop_reason":"end_turn","stop_sequence":null,"usage":{{"input_tokens":512,"#,
            r#""cache_creation_input_tokens":0,"cache_read_input_tokens":1024,"output_tokens":96}}}}"#
        ),
        MODEL
    )
    .into_bytes()
}

/// A streamed Messages answer of `events` events (at least 7; the rest are text deltas).
pub fn anthropic_sse(events: usize) -> Vec<u8> {
    let deltas = events.saturating_sub(6).max(1);
    let mut out = String::with_capacity(300 * events);
    let mut event = |name: &str, data: &str| {
        out.push_str("event: ");
        out.push_str(name);
        out.push_str("\ndata: ");
        out.push_str(data);
        out.push_str("\n\n");
    };
    event(
        "message_start",
        &format!(
            concat!(
                r#"{{"type":"message_start","message":{{"model":"{}","id":"msg_01LoadMockStream00000000","#,
                r#""type":"message","role":"assistant","content":[],"stop_reason":null,"stop_sequence":null,"#,
                r#""usage":{{"input_tokens":512,"cache_creation_input_tokens":0,"cache_read_input_tokens":1024,"#,
                r#""output_tokens":1,"service_tier":"standard"}}}}}}"#
            ),
            MODEL
        ),
    );
    event(
        "content_block_start",
        r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
    );
    event("ping", r#"{"type": "ping"}"#);
    for i in 0..deltas {
        event(
            "content_block_delta",
            &format!(
                r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":"word {i} of a streamed answer, "}}}}"#
            ),
        );
    }
    event(
        "content_block_stop",
        r#"{"type":"content_block_stop","index":0}"#,
    );
    event(
        "message_delta",
        r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":96}}"#,
    );
    event("message_stop", r#"{"type":"message_stop"}"#);
    out.into_bytes()
}

/// The events of [`anthropic_sse`], one slice per event (as an upstream writes them).
pub fn split_events(stream: &[u8]) -> Vec<&[u8]> {
    let mut events = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + 1 < stream.len() {
        if stream[i] == b'\n' && stream[i + 1] == b'\n' {
            events.push(&stream[start..i + 2]);
            start = i + 2;
            i += 2;
        } else {
            i += 1;
        }
    }
    if start < stream.len() {
        events.push(&stream[start..]);
    }
    events
}
