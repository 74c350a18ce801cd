//! End to end on the Anthropic Messages route: a real relay process, a mock Anthropic upstream,
//! the admin API to set things up, and the usage records to check the booking.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::mock_upstream::{MockUpstream, MockUsage};
use common::{conversation, messages_body, Relay};
use futures::StreamExt;

const MODEL: &str = "claude-sonnet-4-5";

struct Setup {
    relay: Relay,
    mock: MockUpstream,
    key: String,
    key_id: String,
    user_id: String,
}

async fn setup_with(price_rate: i64, key_extra: serde_json::Value) -> Setup {
    let mock = MockUpstream::start().await;
    let relay = Relay::start().await;
    let (key_id, key, user_id) = provision(
        &relay,
        &mock.url(),
        "sk-ant-upstream-secret-a",
        price_rate,
        key_extra,
    )
    .await;
    Setup {
        relay,
        mock,
        key,
        key_id,
        user_id,
    }
}

/// On `relay`: a user, one Claude account at `base_url` with `credential`, and an active key of
/// the user. Returns (key id, key, user id).
async fn provision(
    relay: &Relay,
    base_url: &str,
    credential: &str,
    price_rate: i64,
    key_extra: serde_json::Value,
) -> (String, String, String) {
    let user_id = relay.create_user("alice", price_rate).await;
    relay
        .create_account("claude-a", "claude", base_url, credential)
        .await;
    let (key_id, key) = relay.create_key(&user_id, key_extra).await;
    relay.wait_key_active(&key).await;
    (key_id, key, user_id)
}

/// One JSON and one streamed request of a conversation on `topic`, both answered 200: their
/// records, one of each.
async fn json_and_stream(s: &Setup, topic: &str) -> Vec<serde_json::Value> {
    for stream in [false, true] {
        let r = s
            .relay
            .post("/v1/messages", &s.key)
            .json(&messages_body(
                MODEL,
                stream,
                conversation(&format!("{topic} {stream}"), 1),
            ))
            .send()
            .await
            .expect("the relay answers");
        assert_eq!(r.status(), 200);
        r.bytes().await.expect("the whole answer");
    }
    let records = s.relay.wait_records(2).await;
    let streams: Vec<Option<bool>> = records.iter().map(|r| r["stream"].as_bool()).collect();
    assert!(
        streams.contains(&Some(true)) && streams.contains(&Some(false)),
        "{records:?}"
    );
    records
}

async fn setup() -> Setup {
    setup_with(10_000, serde_json::json!({})).await
}

fn assert_anthropic_error(v: &serde_json::Value, kind: &str) {
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], kind, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
}

#[tokio::test]
async fn keys_are_checked_and_errors_have_anthropic_shape() {
    let s = setup_with(
        10_000,
        serde_json::json!({"allowed_models": ["claude-haiku-*"]}),
    )
    .await;
    let body = messages_body("claude-haiku-4-5", false, conversation("auth", 1));

    // No key at all.
    let r = s
        .relay
        .http
        .post(format!("{}/v1/messages", s.relay.proxy))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_anthropic_error(&r.json().await.unwrap(), "authentication_error");

    // A key the relay never issued.
    let r = s
        .relay
        .post("/v1/messages", "sk-relay-not-a-real-key")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_anthropic_error(&r.json().await.unwrap(), "authentication_error");

    // A valid key as Bearer (the anthropic Python SDK) passes.
    let r = s
        .relay
        .http
        .post(format!("{}/v1/messages", s.relay.proxy))
        .bearer_auth(&s.key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // A model outside the allow-list.
    let r = s
        .relay
        .post("/v1/messages", &s.key)
        .json(&messages_body(
            "claude-opus-4-1",
            false,
            conversation("auth", 1),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_anthropic_error(&r.json().await.unwrap(), "permission_error");

    // An expired key (one is not made expired: its expiry passes, here set to the past).
    let (expired_id, expired) = s.relay.create_key(&s.user_id, serde_json::json!({})).await;
    let (st, v) = s
        .relay
        .admin_patch(
            &format!("/api/admin/api-keys/{expired_id}"),
            serde_json::json!({"expires_at": 1000}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = s
        .relay
        .post("/v1/messages", &expired)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_anthropic_error(&v, "authentication_error");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("expired"),
        "{v}"
    );

    // Disabling the key takes effect within a second.
    let (st, _) = s
        .relay
        .admin_patch(
            &format!("/api/admin/api-keys/{}", s.key_id),
            serde_json::json!({"enabled": false}),
        )
        .await;
    assert_eq!(st, 200);
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut served_meanwhile = 0;
    loop {
        let r = s
            .relay
            .post("/v1/messages", &s.key)
            .json(&body)
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            served_meanwhile += 1;
        }
        if r.status() == 401 {
            assert_anthropic_error(&r.json().await.unwrap(), "authentication_error");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "disabled key still accepted after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Refused requests never reach the upstream.
    assert_eq!(s.mock.count(), 1 + served_meanwhile);
}

/// Posts `body`; asserts a 400 `invalid_request_error` whose message names `needle`.
async fn refused_body(s: &Setup, body: serde_json::Value, needle: &str) {
    let r = s
        .relay
        .post("/v1/messages", &s.key)
        .json(&body)
        .send()
        .await
        .expect("the relay answers");
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.expect("a JSON error");
    assert_anthropic_error(&v, "invalid_request_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(needle)),
        "{v}"
    );
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let s = setup().await;
    let r = s
        .relay
        .post("/v1/messages", &s.key)
        .body("{not json")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_anthropic_error(&r.json().await.unwrap(), "invalid_request_error");

    refused_body(&s, serde_json::json!({"messages": []}), "model").await;
    // A model name with a NUL: no provider has it, and PostgreSQL could not store its record.
    refused_body(
        &s,
        serde_json::json!({"model": "claude\u{0}", "messages": []}),
        "model name",
    )
    .await;

    let r = s
        .relay
        .post("/v1/messages", &s.key)
        .json(&serde_json::json!({"model": 5, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // Unknown route.
    let r = s
        .relay
        .post("/v1/nothing", &s.key)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(s.mock.count(), 0);

    // Claude Code's probe and the health check need no key.
    let r = s
        .relay
        .http
        .head(format!("{}/", s.relay.proxy))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn body_over_limit_is_413() {
    let mock = MockUpstream::start().await;
    let relay = Relay::start_with(common::RelayOptions {
        env: vec![("RELAY_MAX_BODY_BYTES".into(), "100000".into())],
        ..Default::default()
    })
    .await;
    let user = relay.create_user("bob", 10_000).await;
    relay
        .create_account("a", "claude", &mock.url(), "sk-ant-a")
        .await;
    let (_, key) = relay.create_key(&user, serde_json::json!({})).await;
    relay.wait_key_active(&key).await;
    let big = "x".repeat(200_000);
    let body = messages_body(
        MODEL,
        false,
        serde_json::json!([{"role": "user", "content": big}]),
    );
    let r = relay
        .post("/v1/messages", &key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_anthropic_error(&r.json().await.unwrap(), "request_too_large");
    assert_eq!(mock.count(), 0);
}

#[tokio::test]
async fn no_account_is_503() {
    let relay = Relay::start().await;
    let user = relay.create_user("carol", 10_000).await;
    let (_, key) = relay.create_key(&user, serde_json::json!({})).await;
    relay.wait_key_active(&key).await;
    let r = relay
        .post("/v1/messages", &key)
        .json(&messages_body(MODEL, false, conversation("x", 1)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_anthropic_error(&r.json().await.unwrap(), "no_available_account");
}

#[tokio::test]
async fn streaming_is_not_buffered() {
    let s = setup().await;
    // The mock holds the second event until the client has the first: a relay that buffers
    // delivers the first only after the gate's 10 s, when the second is sent.
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    let held = gate.clone();
    s.mock.set(move |b| b.second_event_gate = Some(held));
    let sent = Instant::now();
    let r = s
        .relay
        .post("/v1/messages", &s.key)
        .json(&messages_body(MODEL, true, conversation("stream", 1)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut stream = r.bytes_stream();
    let mut seen = Vec::new();
    let mut first_event_at = None;
    while let Some(chunk) = stream.next().await {
        seen.extend_from_slice(&chunk.unwrap());
        if first_event_at.is_none()
            && seen.windows(15).any(|w| w == b"event: message_")
            && seen.windows(2).any(|w| w == b"\n\n")
        {
            first_event_at = Some(Instant::now());
            gate.notify_one();
        }
    }
    let first = first_event_at.expect("first event");
    let second_sent = s
        .mock
        .second_event_sent
        .lock()
        .unwrap()
        .expect("mock sent the second event");
    assert!(
        first < second_sent,
        "the first event reached the client only after the mock sent the second"
    );
    // Nor held back for a while: the mock sends it at once.
    assert!(
        first - sent < Duration::from_secs(3),
        "the first event took {:?}",
        first - sent
    );
    let text = String::from_utf8(seen).unwrap();
    assert!(text.contains("event: message_stop"), "{text}");
}

#[tokio::test]
async fn credentials_are_swapped_and_5_mib_body_arrives_intact() {
    let s = setup().await;
    // 5 MiB of varied content in one message.
    let filler: String = (0u64..5 * 1024 * 1024 / 16)
        .map(|i| format!("{:015x}|", i * 7919))
        .collect();
    let body = serde_json::to_vec(&messages_body(
        MODEL,
        false,
        serde_json::json!([{"role": "user", "content": filler}]),
    ))
    .unwrap();
    assert!(body.len() > 5 * 1024 * 1024);
    let r = s
        .relay
        .post("/v1/messages", &s.key)
        .header("content-type", "application/json")
        .header("cookie", "session=abc")
        .header("x-forwarded-for", "203.0.113.9")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-request-id"));
    let got = s.mock.requests();
    assert_eq!(got.len(), 1);
    let req = &got[0];
    assert_eq!(req.path, "/v1/messages");
    assert!(
        req.body == body,
        "upstream body differs ({} vs {} bytes)",
        req.body.len(),
        body.len()
    );
    assert_eq!(req.header("x-api-key"), Some("sk-ant-upstream-secret-a"));
    assert_eq!(req.header("authorization"), None);
    assert_eq!(req.header("cookie"), None);
    assert_eq!(req.header("x-forwarded-for"), None);
    assert_eq!(req.header("accept-encoding"), Some("identity"));
    assert_eq!(req.header("anthropic-version"), Some("2023-06-01"));
    for (k, v) in &req.headers {
        assert!(!v.contains(&s.key), "client key leaked upstream in {k}");
    }

    // The same body again, announced with Expect: 100-continue over a raw connection.
    let addr = s.relay.proxy.trim_start_matches("http://").to_string();
    let key = s.key.clone();
    let body2 = body.clone();
    let (status_line, saw_continue) = tokio::task::spawn_blocking(move || {
        let mut sock = std::net::TcpStream::connect(&addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let head = format!(
            "POST /v1/messages HTTP/1.1\r\nhost: {addr}\r\nx-api-key: {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nexpect: 100-continue\r\n\r\n",
            body2.len()
        );
        sock.write_all(head.as_bytes()).unwrap();
        let mut buf = [0u8; 256];
        let n = sock.read(&mut buf).unwrap();
        let interim = String::from_utf8_lossy(&buf[..n]).to_string();
        let saw_continue = interim.starts_with("HTTP/1.1 100");
        sock.write_all(&body2).unwrap();
        let mut rest = Vec::new();
        let mut tmp = [0u8; 65536];
        loop {
            let n = sock.read(&mut tmp).unwrap_or(0);
            if n == 0 {
                break;
            }
            rest.extend_from_slice(&tmp[..n]);
            if rest.windows(4).any(|w| w == b"\r\n\r\n") && String::from_utf8_lossy(&rest).contains("msg_mock_1") {
                break;
            }
        }
        let all = format!("{interim}{}", String::from_utf8_lossy(&rest));
        let final_status = all.lines().find(|l| l.starts_with("HTTP/1.1 2") || l.starts_with("HTTP/1.1 4") || l.starts_with("HTTP/1.1 5")).unwrap_or("").to_string();
        (final_status, saw_continue)
    })
    .await
    .unwrap();
    assert!(saw_continue, "the relay did not answer 100 Continue");
    assert!(status_line.starts_with("HTTP/1.1 200"), "{status_line}");
    let got = s.mock.requests();
    assert_eq!(got.len(), 2);
    assert!(got[1].body == body, "body sent after 100-continue differs");
    assert_eq!(got[1].header("expect"), None, "Expect was forwarded");
}

#[tokio::test]
async fn client_disconnect_still_books_final_usage() {
    let s = setup().await;
    s.mock.set(|b| {
        b.usage = MockUsage {
            input: 321,
            output: 654,
            ..Default::default()
        };
        b.deltas = 20;
        b.pause_after_first = Duration::from_millis(200);
        b.event_delay = Duration::from_millis(30);
    });
    let r = s
        .relay
        .post("/v1/messages", &s.key)
        .json(&messages_body(MODEL, true, conversation("bye", 1)))
        .send()
        .await
        .unwrap();
    let mut stream = r.bytes_stream();
    let first = stream.next().await.expect("first chunk").unwrap();
    assert!(!first.is_empty());
    drop(stream); // the client goes away mid-stream
    let records = s.relay.wait_records(1).await;
    let rec = &records[0];
    assert_eq!(rec["input_tokens"], 321, "{rec}");
    assert_eq!(rec["output_tokens"], 654, "{rec}");
    assert_eq!(
        *s.mock.streams_completed.lock().unwrap(),
        1,
        "the relay did not drain the upstream"
    );
}

#[tokio::test]
async fn conversations_stick_and_spread() {
    let mock_a = MockUpstream::start().await;
    let mock_b = MockUpstream::start().await;
    let relay = Relay::start().await;
    let user = relay.create_user("dave", 10_000).await;
    relay
        .create_account("claude-a", "claude", &mock_a.url(), "sk-ant-a")
        .await;
    relay
        .create_account("claude-b", "claude", &mock_b.url(), "sk-ant-b")
        .await;
    let (_, key) = relay.create_key(&user, serde_json::json!({})).await;
    relay.wait_key_active(&key).await;

    // Each conversation: turn 1 (1 message), then turn 2 (3 messages) must hit the same account.
    // Equal accounts are picked at random by weight: 24 conversations all land on one with
    // probability 2^-23.
    let mut per_conversation = Vec::new();
    for c in 0..24 {
        let topic = format!("conversation {c}");
        let before = (mock_a.count(), mock_b.count());
        for turns in [1, 2] {
            let r = relay
                .post("/v1/messages", &key)
                .json(&messages_body(MODEL, false, conversation(&topic, turns)))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
        let after = (mock_a.count(), mock_b.count());
        let (da, db) = (after.0 - before.0, after.1 - before.1);
        assert!(
            (da, db) == (2, 0) || (da, db) == (0, 2),
            "conversation {c} split across accounts: {da}/{db}"
        );
        per_conversation.push(da == 2);
    }
    let on_a = per_conversation.iter().filter(|x| **x).count();
    assert!(
        on_a > 0 && on_a < 24,
        "24 conversations all landed on one account ({on_a} on a)"
    );
}

#[tokio::test]
async fn usage_records_carry_exact_tokens_and_cost() {
    // Price rate 1.5; claude-sonnet-4-5: input $3, output $15, 5m write $3.75, 1h write $6,
    // read $0.30 per million tokens.
    let s = setup_with(15_000, serde_json::json!({})).await;
    s.mock.set(|b| {
        b.usage = MockUsage {
            input: 1234,
            output: 567,
            cache_write_5m: 2000,
            cache_write_1h: 1000,
            cache_read: 4321,
        };
    });
    // base = 1234*3 + 567*15 + 2000*3.75 + 1000*6 + 4321*0.3 = 27003.3 -> 27003 micro-USD
    // billed = 27003 * 1.5 = 40504.5 -> 40505 (half up)
    let records = json_and_stream(&s, "cost").await;
    for rec in &records {
        assert_eq!(rec["input_tokens"], 1234, "{rec}");
        assert_eq!(rec["output_tokens"], 567, "{rec}");
        assert_eq!(rec["cache_write_5m_tokens"], 2000, "{rec}");
        assert_eq!(rec["cache_write_1h_tokens"], 1000, "{rec}");
        assert_eq!(rec["cache_read_tokens"], 4321, "{rec}");
        assert_eq!(rec["base_cost"], 27003, "{rec}");
        assert_eq!(rec["billed_cost"], 40505, "{rec}");
        assert_eq!(rec["status"], 200, "{rec}");
        assert_eq!(rec["user_id"], s.user_id.as_str(), "{rec}");
        assert_eq!(rec["api_key_id"], s.key_id.as_str(), "{rec}");
        assert_eq!(rec["upstream_model"], "claude-sonnet-4-5-20250929", "{rec}");
    }
}

/// Claude Code's WebSearch tool: Anthropic runs the searches and reports them in
/// `usage.server_tool_use`; each one is booked at $10 per 1 000 on top of the tokens.
#[tokio::test]
async fn web_searches_are_booked_and_billed() {
    let s = setup_with(15_000, serde_json::json!({})).await;
    s.mock.set(|b| {
        b.usage = MockUsage::io(1000, 500);
        b.extra_usage.web_searches = 3;
    });
    // base = 1000×3 + 500×15 + 3 × 10 000 = 40 500 micro-USD; billed at 1.5: 60 750.
    let records = json_and_stream(&s, "search").await;
    for rec in &records {
        assert_eq!(rec["web_search_requests"], 3, "{rec}");
        assert_eq!(rec["input_tokens"], 1000, "{rec}");
        assert_eq!(rec["output_tokens"], 500, "{rec}");
        assert_eq!(rec["base_cost"], 40_500, "{rec}");
        assert_eq!(rec["billed_cost"], 60_750, "{rec}");
    }
}

#[tokio::test]
async fn failover_on_429_and_cut_streams_end_with_error_event() {
    let mock_a = MockUpstream::start().await;
    let mock_b = MockUpstream::start().await;
    let relay = Relay::start().await;
    let user = relay.create_user("erin", 10_000).await;
    relay
        .create_account("claude-a", "claude", &mock_a.url(), "sk-ant-a")
        .await;
    relay
        .create_account("claude-b", "claude", &mock_b.url(), "sk-ant-b")
        .await;
    let (_, key) = relay.create_key(&user, serde_json::json!({})).await;
    relay.wait_key_active(&key).await;
    mock_a.set(|b| {
        b.status = 429;
        b.error_body =
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#.into();
        b.extra_headers = vec![("retry-after".into(), "30".into())];
    });
    for i in 0..4 {
        let r = relay
            .post("/v1/messages", &key)
            .json(&messages_body(
                MODEL,
                false,
                conversation(&format!("f{i}"), 1),
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i} was not failed over");
    }
    assert!(
        mock_a.count() <= 1,
        "a cooling account kept receiving requests: {}",
        mock_a.count()
    );
    assert_eq!(mock_b.count(), 4);

    // A stream cut midway: the client sees Anthropic's error event, and the usage seen is booked.
    mock_b.set(|b| {
        b.cut_after = Some(4);
        b.usage = MockUsage {
            input: 77,
            output: 5,
            ..Default::default()
        };
    });
    let r = relay
        .post("/v1/messages", &key)
        .json(&messages_body(MODEL, true, conversation("cut", 1)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = String::from_utf8(r.bytes().await.unwrap().to_vec()).unwrap();
    assert!(text.contains("event: error"), "{text}");
    assert!(!text.contains("message_stop"));
    let records = relay.wait_records(5).await;
    let cut = records
        .iter()
        .find(|r| r["stream"] == true)
        .expect("cut record");
    assert_eq!(cut["input_tokens"], 77, "{cut}");
    assert_eq!(cut["error_type"], "upstream_error", "{cut}");

    // A JSON answer cut midway must not reach the client looking whole: no last chunk, and
    // the connection closes, so the client's read of the body fails.
    mock_b.set(|b| {
        b.cut_after = None;
        b.cut_json_after = Some(40);
    });
    let r = relay
        .post("/v1/messages", &key)
        .json(&messages_body(MODEL, false, conversation("cut-json", 1)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.bytes().await.is_err(),
        "a cut answer was read as complete"
    );
    let records = relay.wait_records(6).await;
    assert!(
        records
            .iter()
            .any(|r| r["stream"] == false && r["error_type"] == "upstream_error"),
        "{records:?}"
    );
}

/// Reads one HTTP/1.1 response (content-length or chunked) from a blocking socket.
#[allow(clippy::unwrap_used)]
fn read_response(
    sock: &mut std::io::BufReader<std::net::TcpStream>,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    use std::io::BufRead;
    let mut line = String::new();
    sock.read_line(&mut line).unwrap();
    let status: u16 = line.split(' ').nth(1).unwrap_or("0").parse().unwrap_or(0);
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        sock.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let mut body = Vec::new();
    if let Some(len) = get("content-length") {
        body.resize(len.parse().unwrap(), 0);
        sock.read_exact(&mut body).unwrap();
    } else {
        assert_eq!(
            get("transfer-encoding").as_deref(),
            Some("chunked"),
            "no framing: {headers:?}"
        );
        loop {
            let mut size = String::new();
            sock.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            let mut chunk = vec![0; n + 2];
            sock.read_exact(&mut chunk).unwrap();
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    (status, headers, body)
}

#[tokio::test]
async fn keep_alive_connections_carry_streams_and_json_one_after_another() {
    let s = setup().await;
    let addr = s.relay.proxy.trim_start_matches("http://").to_string();
    let key = s.key.clone();
    tokio::task::spawn_blocking(move || {
        let sock = std::net::TcpStream::connect(&addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut writer = sock.try_clone().unwrap();
        let mut reader = std::io::BufReader::new(sock);
        for i in 0..12 {
            let stream = i % 3 != 0;
            let body = serde_json::to_vec(&messages_body(MODEL, stream, conversation(&format!("ka {i}"), 1))).unwrap();
            let head = format!(
                "POST /v1/messages HTTP/1.1\r\nhost: {addr}\r\nx-api-key: {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            writer.write_all(head.as_bytes()).unwrap();
            writer.write_all(&body).unwrap();
            let (status, _, body) = read_response(&mut reader);
            assert_eq!(status, 200, "request {i} on the reused connection");
            let text = String::from_utf8(body).unwrap();
            if stream {
                assert!(text.contains("event: message_stop"), "request {i}: {text}");
            } else {
                assert!(text.contains("msg_mock_1"), "request {i}: {text}");
            }
        }
    })
    .await
    .unwrap();
    // Each exchange read its answer to the end, so the upstream connection went back to the
    // pool and served the next request.
    assert_eq!(*s.mock.connections.lock().unwrap(), 1);
    assert_eq!(s.mock.count(), 12);
}

/// A key whose one account is the TLS mock at `url`.
async fn key_for_tls_account(relay: &Relay, url: &str) -> String {
    provision(
        relay,
        url,
        "sk-ant-upstream-tls",
        10_000,
        serde_json::json!({}),
    )
    .await
    .1
}

#[tokio::test]
async fn tls_upstream_is_verified_and_its_connection_pooled() {
    let (mock, tls) = MockUpstream::start_tls().await;
    let relay = Relay::start_with(common::RelayOptions {
        env: vec![(
            "SSL_CERT_FILE".to_owned(),
            tls.ca_file.display().to_string(),
        )],
        ..Default::default()
    })
    .await;
    let key = key_for_tls_account(&relay, &tls.url).await;

    for i in 0..4 {
        let stream = i % 2 == 1;
        let r = relay
            .post_json(
                "/v1/messages",
                &key,
                &messages_body(MODEL, stream, conversation("tls", 1)),
            )
            .await;
        assert_eq!(r.status(), 200, "request {i}");
        let text = r.text().await.unwrap();
        if stream {
            assert!(text.contains("event: message_stop"), "request {i}: {text}");
        } else {
            assert!(text.contains("msg_mock_1"), "request {i}: {text}");
        }
    }
    let received = mock.requests();
    assert_eq!(received.len(), 4);
    assert!(received.iter().all(|r| r
        .headers
        .iter()
        .any(|(k, v)| k == "x-api-key" && v == "sk-ant-upstream-tls")));
    // One TLS connection served all four exchanges.
    assert_eq!(*mock.connections.lock().unwrap(), 1);

    // A relay that does not trust the test CA refuses the upstream: no request reaches it.
    let untrusting = Relay::start().await;
    let key = key_for_tls_account(&untrusting, &tls.url).await;
    let r = untrusting
        .post_json(
            "/v1/messages",
            &key,
            &messages_body(MODEL, false, conversation("tls", 1)),
        )
        .await;
    assert_eq!(r.status(), 502);
    assert_eq!(mock.requests().len(), 4);
}

#[tokio::test]
async fn an_upstream_refusing_the_body_early_is_answered_with_its_own_status() {
    let s = setup().await;
    s.mock.set(|b| b.refuse_body_with = Some(413));
    // Far more than the sockets buffer: the upstream closes while the relay still writes.
    let mut body = messages_body(MODEL, false, conversation("large", 1));
    body["metadata"] = serde_json::json!({"padding": "x".repeat(12 << 20)});
    let r = s.relay.post_json("/v1/messages", &s.key, &body).await;
    assert_eq!(r.status(), 413);
    let v: serde_json::Value = r.json().await.unwrap();
    // The upstream's own answer, not one of the relay's.
    assert_eq!(
        v["error"]["message"], "Request exceeds the maximum allowed number of bytes.",
        "{v}"
    );
}

#[tokio::test]
async fn a_blocked_account_stays_out_until_an_admin_puts_it_back() {
    let Setup {
        relay, mock, key, ..
    } = setup().await;
    let accounts = relay.admin_get("/api/admin/accounts").await;
    let id = accounts["items"][0]["id"]
        .as_str()
        .expect("the account")
        .to_string();
    let ask = |topic: &str| {
        relay
            .post("/v1/messages", &key)
            .json(&messages_body(MODEL, false, conversation(topic, 1)))
            .send()
    };
    assert_eq!(ask("before").await.unwrap().status(), 200);

    // The provider says the organization is disabled: the account is taken out of scheduling
    // at once, and with no other account the client is told the upstream failed (not that it
    // lacks a permission).
    mock.set(|b| {
        b.status = 403;
        b.error_body = r#"{"type":"error","error":{"type":"permission_error","message":"This organization has been disabled."}}"#.into();
    });
    let r = ask("blocked").await.unwrap();
    assert_eq!(r.status(), 502);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "upstream_error", "{v}");
    mock.set(|b| b.status = 200);
    let asked = mock.count();
    // It stays out over several of the relay's reloads (every 500 ms), stale or not.
    let until = Instant::now() + Duration::from_millis(1_500);
    while Instant::now() < until {
        let r = ask("while blocked").await.unwrap();
        assert_eq!(r.status(), 503, "{}", r.text().await.unwrap_or_default());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(mock.count(), asked, "the blocked account was asked again");
    let v = relay.admin_get(&format!("/api/admin/accounts/{id}")).await;
    assert_eq!(v["status"], "blocked", "{v}");

    // An operator puts it back: it serves the next request.
    let (st, v) = relay
        .admin_patch(
            &format!("/api/admin/accounts/{id}"),
            serde_json::json!({"status": "valid"}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(ask("after").await.unwrap().status(), 200);
    assert_eq!(mock.count(), asked + 1);

    // Blocked again on the account the operator put back: taken out again (what its requests
    // saw is stored over the operator's word they were sent after).
    let blocked_body = r#"{"type":"error","error":{"type":"permission_error","message":"This organization has been disabled."}}"#;
    mock.set(|b| {
        b.status = 403;
        b.error_body = blocked_body.into();
    });
    assert_eq!(ask("blocked again").await.unwrap().status(), 502);
    let stored = |want: &'static str| {
        let relay = &relay;
        let id = id.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let v = relay.admin_get(&format!("/api/admin/accounts/{id}")).await;
                if v["status"] == want {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "status {} not {want}",
                    v["status"]
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    stored("blocked").await;

    // A block answered to a request sent before the operator replaced the credential (and
    // put the account back) is not stored: that request ran on the old key.
    let (st, v) = relay
        .admin_patch(
            &format!("/api/admin/accounts/{id}"),
            serde_json::json!({"status": "valid"}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    mock.set(|b| b.head_delay = Duration::from_millis(1_500));
    let late = tokio::spawn(
        relay
            .post("/v1/messages", &key)
            .json(&messages_body(
                MODEL,
                false,
                conversation("on the old key", 1),
            ))
            .send(),
    );
    while mock.count() < asked + 3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (st, v) = relay
        .admin_patch(
            &format!("/api/admin/accounts/{id}"),
            serde_json::json!({"credential": "sk-ant-replaced-key"}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(late.await.unwrap().unwrap().status(), 502);
    mock.set(|b| {
        b.status = 200;
        b.head_delay = Duration::ZERO;
    });
    // The node took the account out when the block came; once the refused write and a reload
    // have gone by (well under a second here), it serves again on the new key, its stored
    // status never having turned.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = ask("new key").await.unwrap().status();
        if status == 200 {
            break;
        }
        assert_eq!(status, 503);
        assert!(Instant::now() < deadline, "the account stays out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v = relay.admin_get(&format!("/api/admin/accounts/{id}")).await;
    assert_eq!(v["status"], "valid", "{v}");
    let last = mock.requests().pop().unwrap();
    assert_eq!(last.header("x-api-key"), Some("sk-ant-replaced-key"));
}

/// The events of an SSE stream as a client's parser sees them (the WHATWG event stream rules,
/// for `\n` line ends): (event type, data) for each event a blank line dispatches.
fn sse_events(text: &str) -> Vec<(String, String)> {
    let mut events = Vec::new();
    let (mut kind, mut data) = (String::new(), Vec::<&str>::new());
    for line in text.split('\n') {
        if line.is_empty() {
            if !data.is_empty() {
                let kind = if kind.is_empty() { "message" } else { &kind };
                events.push((kind.to_string(), data.join("\n")));
            }
            kind.clear();
            data.clear();
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => kind = value.to_string(),
            "data" => data.push(value),
            _ => {}
        }
    }
    events
}

#[tokio::test]
async fn a_stream_cut_inside_an_event_still_ends_with_an_error_event() {
    let s = setup().await;
    // The upstream sends half of its fifth event, then goes away.
    s.mock.set(|b| {
        b.cut_after = Some(4);
        b.cut_mid_event = true;
    });
    let r = s
        .relay
        .post("/v1/messages", &s.key)
        .json(&messages_body(MODEL, true, conversation("half", 1)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = String::from_utf8(r.bytes().await.unwrap().to_vec()).unwrap();
    let events = sse_events(&text);
    let (kind, data) = events.last().expect("events");
    assert_eq!(kind, "error", "{text}");
    let v: serde_json::Value = serde_json::from_str(data).unwrap();
    assert_anthropic_error(&v, "upstream_error");
}

/// What names the operator's provider account (its organization and project, its cookies) does
/// not reach the tenant: not in the answer's headers, not in an error body passed through.
#[tokio::test]
async fn the_provider_accounts_organization_does_not_reach_the_tenant() {
    let s = setup_with(10_000, serde_json::json!({})).await;
    // A client error, passed through as it came but for what names the account.
    s.mock.set(|b| {
        b.status = 400;
        b.error_body = r#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens too large for organization org-OperatorOrg12345"}}"#.into();
        b.extra_headers = vec![
            ("anthropic-organization-id".into(), "4f1c2a9e-org-of-the-operator".into()),
            ("openai-organization".into(), "org-OperatorOrg12345".into()),
            ("openai-project".into(), "proj_OperatorProject1".into()),
            ("set-cookie".into(), "__cf_bm=operator-cookie; path=/".into()),
            ("anthropic-ratelimit-requests-remaining".into(), "99".into()),
        ];
    });
    let body = messages_body(MODEL, false, conversation("org", 1));
    let r = s.relay.post_json("/v1/messages", &s.key, &body).await;
    assert_eq!(r.status(), 400);
    for name in [
        "anthropic-organization-id",
        "openai-organization",
        "openai-project",
        "set-cookie",
    ] {
        assert!(!r.headers().contains_key(name), "{name} reached the tenant");
    }
    assert_eq!(r.headers()["anthropic-ratelimit-requests-remaining"], "99");
    let text = r.text().await.unwrap();
    assert!(!text.contains("OperatorOrg"), "{text}");
    assert!(text.contains("organization org-****************"), "{text}");
    assert_eq!(s.mock.count(), 1, "a client error is not failed over");
}
