//! End to end on the OpenAI Chat Completions, OpenAI Responses (Codex) and Gemini routes: a real
//! relay process, mock upstreams answering in the protocol the path implies, real client
//! captures from `tests/fixtures/client-requests/`, and the usage records to check the booking.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::mock_upstream::{ExtraUsage, MockUpstream, MockUsage};
use common::{
    assert_no_relay_key, chat_body, chat_conversation, conversation, gemini_body, messages_body,
    record_by_id, record_by_request_id, ClientFixture, Relay,
};

/// Upstream credentials of the test accounts (never the relay key).
const OPENAI_SECRET: &str = "sk-openai-upstream-secret-0123";
const GEMINI_SECRET: &str = "AIza-gemini-upstream-secret-0123";

/// A relay with one user and one key, plus the key's id.
async fn relay_with_key(key_extra: serde_json::Value) -> (Relay, String, String, String) {
    let relay = Relay::start().await;
    let user_id = relay.create_user("alice", 10_000).await;
    let (key_id, key) = relay.create_key(&user_id, key_extra).await;
    relay.wait_key_active(&key).await;
    (relay, user_id, key_id, key)
}

fn assert_openai_error(v: &serde_json::Value, kind: &str, code: &str) {
    assert_eq!(v["error"]["type"], kind, "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    assert!(
        v.get("type").is_none(),
        "Anthropic shape on an OpenAI route: {v}"
    );
}

fn assert_gemini_error(v: &serde_json::Value, code: u16, status: &str) {
    assert_eq!(v["error"]["code"], code, "{v}");
    assert_eq!(v["error"]["status"], status, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
}

/// The `data:` payloads of an SSE body, in order.
fn sse_data(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.trim().to_string())
        .collect()
}

/// The `event:` names of an SSE body, in order.
fn sse_events(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("event:"))
        .map(|d| d.trim().to_string())
        .collect()
}

/// How many conversations the spread checks send. Accounts of equal priority are picked at
/// random by weight, so with two accounts all of them land on one with probability 2^(1-n):
/// one in eight million at 24.
const CONVERSATIONS: usize = 24;

/// Sends `turns` 1 and 2 of [`CONVERSATIONS`] conversations built by `request(topic, turns)`:
/// both turns of each conversation must reach one account, and the conversations must not all
/// reach the same.
async fn assert_conversations_stick_and_spread(
    mock_a: &MockUpstream,
    mock_b: &MockUpstream,
    request: impl Fn(&str, usize) -> reqwest::RequestBuilder,
) {
    let mut on_a = 0;
    for c in 0..CONVERSATIONS {
        let topic = format!("conversation {c}");
        let before = (mock_a.count(), mock_b.count());
        for turns in [1, 2] {
            let r = request(&topic, turns).send().await.expect("relay answers");
            assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
            let _ = r.bytes().await.expect("answer body");
        }
        let (da, db) = (mock_a.count() - before.0, mock_b.count() - before.1);
        assert!(
            (da, db) == (2, 0) || (da, db) == (0, 2),
            "conversation {c} split across accounts: {da}/{db}"
        );
        if da == 2 {
            on_a += 1;
        }
    }
    assert!(
        on_a > 0 && on_a < CONVERSATIONS,
        "{CONVERSATIONS} conversations all landed on one account ({on_a} on a)"
    );
}

// ---------------------------------------------------------------------------------------------
// OpenAI Chat Completions
// ---------------------------------------------------------------------------------------------

/// Chat reasoning tokens (inside `completion_tokens`).
const CHAT_EXTRA: ExtraUsage = ExtraUsage {
    reasoning: 64,
    tool_use: 0,
    web_searches: 0,
};

/// gpt-4.1: input $2, output $8, cached input $0.50 per million tokens.
/// prompt 1500 of which 400 cached, completion 250 (64 reasoning):
/// 1100×2 + 250×8 + 400×0.5 = 4400 micro-USD.
const CHAT_USAGE: MockUsage = MockUsage {
    input: 1500,
    output: 250,
    cache_write_5m: 0,
    cache_write_1h: 0,
    cache_read: 400,
};

/// An `openai` account "openai-a" on `mock` (under `/v1`, as OpenAI's base URL has it); its id.
async fn openai_account(relay: &Relay, mock: &MockUpstream) -> String {
    relay
        .create_account(
            "openai-a",
            "openai",
            &format!("{}/v1", mock.url()),
            OPENAI_SECRET,
        )
        .await
}

async fn gemini_account(relay: &Relay, mock: &MockUpstream) -> String {
    relay
        .create_account("gemini-a", "gemini", &mock.url(), GEMINI_SECRET)
        .await
}

#[tokio::test]
async fn chat_json_and_streams_swap_credentials_and_book_normalised_usage() {
    let mock = MockUpstream::start().await;
    let (relay, user_id, key_id, key) = relay_with_key(serde_json::json!({})).await;
    let account_id = openai_account(&relay, &mock).await;
    relay.wait_accounts_loaded(1).await;
    mock.set(|b| {
        b.usage = CHAT_USAGE;
        b.extra_usage = CHAT_EXTRA;
        b.upstream_model = Some("gpt-4.1-2025-04-14".into());
    });

    // 1. JSON, key as Bearer (the openai SDK), with the SDK's own headers.
    let sdk = ClientFixture::load("sdk-openai-chat.turn1.json");
    let mut body = sdk.body.clone();
    body["model"] = "gpt-4.1".into();
    let sent = serde_json::to_vec(&body).unwrap();
    let r = relay
        .post_bare("/v1/chat/completions")
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .header("user-agent", sdk.header("user-agent").unwrap())
        .header("x-stainless-lang", "python")
        .header("x-request-id", "chat-json")
        .body(sent.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // OpenAI's own id of the request reaches the client (the client's went upstream).
    assert_eq!(
        r.headers()["x-request-id"],
        format!("req_mock_{}_1", mock.port).as_str()
    );
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion", "{v}");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "Hello from the mock."
    );
    // The answer reaches the client as the upstream sent it.
    assert_eq!(v["usage"]["prompt_tokens"], 1500, "{v}");
    let got = mock.requests();
    assert_eq!(got.len(), 1);
    let up = &got[0];
    assert_eq!(up.path, "/v1/chat/completions");
    assert_eq!(
        up.header("authorization"),
        Some(format!("Bearer {OPENAI_SECRET}").as_str())
    );
    assert_eq!(up.header("x-api-key"), None);
    assert_eq!(up.header("x-stainless-lang"), Some("python"));
    assert_eq!(up.header("accept-encoding"), Some("identity"));
    assert_eq!(up.header("x-request-id"), Some("chat-json"));
    assert!(up.body == sent, "a non-stream Chat body was changed");
    assert_no_relay_key(up, &key);

    // 2. A stream from a client that did not ask for usage: the relay asks for it upstream and
    //    hides the extra chunk from the client.
    let r = relay
        .post_bare("/v1/chat/completions")
        .bearer_auth(&key)
        .header("x-request-id", "chat-stream-hidden")
        .json(&chat_body("gpt-4.1", true, chat_conversation("stream", 1)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = r.text().await.unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
    assert_eq!(
        data.len(),
        3 + 2 + 1,
        "role, 3 deltas, finish, [DONE]: {text}"
    );
    assert!(
        !text.contains("\"prompt_tokens\""),
        "usage chunk forwarded to a client that did not ask for it: {text}"
    );
    assert!(text.contains("word2 "), "{text}");
    let up = &mock.requests()[1];
    assert_eq!(up.path, "/v1/chat/completions");
    assert_eq!(
        up.json()["stream_options"]["include_usage"],
        true,
        "{}",
        up.json()
    );
    assert_no_relay_key(up, &key);

    // 2b. `include_usage: false` is forced to true upstream, and the chunk still hidden.
    let mut declined = chat_body("gpt-4.1", true, chat_conversation("declined", 1));
    declined["stream_options"] = serde_json::json!({"include_usage": false});
    let r = relay
        .post_bare("/v1/chat/completions")
        .bearer_auth(&key)
        .header("x-request-id", "chat-stream-declined")
        .json(&declined)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert_eq!(
        sse_data(&text).last().map(String::as_str),
        Some("[DONE]"),
        "{text}"
    );
    assert!(!text.contains("\"prompt_tokens\""), "{text}");
    let up = mock.requests()[2].json();
    assert_eq!(up["stream_options"]["include_usage"], true, "{up}");
    assert_eq!(up["messages"], declined["messages"], "{up}");

    // 3. A stream from a client that asked for usage: the usage chunk reaches it, body intact.
    let mut asked = chat_body("gpt-4.1", true, chat_conversation("usage", 1));
    asked["stream_options"] = serde_json::json!({"include_usage": true});
    let sent = serde_json::to_vec(&asked).unwrap();
    let r = relay
        .post_bare("/v1/chat/completions")
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .header("x-request-id", "chat-stream-asked")
        .body(sent.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
    let usage_chunk: serde_json::Value =
        serde_json::from_str(&data[data.len() - 2]).unwrap_or_default();
    assert_eq!(usage_chunk["choices"], serde_json::json!([]), "{text}");
    assert_eq!(usage_chunk["usage"]["prompt_tokens"], 1500, "{text}");
    assert!(
        mock.requests()[3].body == sent,
        "a Chat body asking for usage was changed"
    );

    // 4. The `/chat/completions` alias, key as x-api-key.
    let r = relay
        .post_bare("/chat/completions")
        .header("x-api-key", &key)
        .header("x-request-id", "chat-alias")
        .json(&chat_body("gpt-4.1", false, chat_conversation("alias", 1)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let up = &mock.requests()[4];
    assert_eq!(up.path, "/v1/chat/completions");
    assert_eq!(
        up.header("authorization"),
        Some(format!("Bearer {OPENAI_SECRET}").as_str())
    );
    assert_no_relay_key(up, &key);

    // Every answer booked with input = prompt − cached, cache_read = cached.
    let records = relay.wait_records(5).await;
    for (id, stream) in [
        ("chat-json", false),
        ("chat-stream-hidden", true),
        ("chat-stream-declined", true),
        ("chat-stream-asked", true),
        ("chat-alias", false),
    ] {
        let rec = record_by_request_id(&records, id);
        assert_eq!(rec["protocol"], "openai_chat", "{rec}");
        assert_eq!(rec["stream"], stream, "{rec}");
        assert_eq!(rec["status"], 200, "{rec}");
        assert_eq!(rec["input_tokens"], 1100, "{rec}");
        assert_eq!(rec["cache_read_tokens"], 400, "{rec}");
        assert_eq!(rec["output_tokens"], 250, "{rec}");
        assert_eq!(rec["reasoning_tokens"], 64, "{rec}");
        assert_eq!(rec["cache_write_5m_tokens"], 0, "{rec}");
        assert_eq!(rec["cache_write_1h_tokens"], 0, "{rec}");
        assert_eq!(rec["requested_model"], "gpt-4.1", "{rec}");
        assert_eq!(rec["upstream_model"], "gpt-4.1-2025-04-14", "{rec}");
        assert_eq!(rec["base_cost"], 4400, "{rec}");
        assert_eq!(rec["billed_cost"], 4400, "{rec}");
        assert_eq!(rec["account_id"], account_id.as_str(), "{rec}");
        assert_eq!(rec["user_id"], user_id.as_str(), "{rec}");
        assert_eq!(rec["api_key_id"], key_id.as_str(), "{rec}");
    }
}

#[tokio::test]
async fn chat_errors_have_openai_shape() {
    let mock = MockUpstream::start().await;
    let (relay, user_id, _, key) = relay_with_key(serde_json::json!({})).await;
    openai_account(&relay, &mock).await;
    relay.wait_accounts_loaded(1).await;
    let body = chat_body("gpt-4.1", false, chat_conversation("errors", 1));

    // No key at all.
    let r = relay
        .post_bare("/v1/chat/completions")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_openai_error(
        &r.json().await.unwrap(),
        "authentication_error",
        "invalid_api_key",
    );

    // The Responses route answers in the same shape.
    let r = relay
        .post_bare("/v1/responses")
        .json(&serde_json::json!({"model": "gpt-5", "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_openai_error(
        &r.json().await.unwrap(),
        "authentication_error",
        "invalid_api_key",
    );

    // A key the relay never issued, as Bearer.
    let r = relay
        .post_bare("/v1/chat/completions")
        .bearer_auth("sk-relay-not-a-real-key")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_openai_error(
        &r.json().await.unwrap(),
        "authentication_error",
        "invalid_api_key",
    );

    // Malformed JSON.
    let r = relay
        .post_bare("/v1/chat/completions")
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body("{\"model\": \"gpt-4.1\", \"messages\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_openai_error(
        &r.json().await.unwrap(),
        "invalid_request_error",
        "invalid_request",
    );

    // No model.
    let r = relay
        .post_bare("/v1/chat/completions")
        .bearer_auth(&key)
        .json(&serde_json::json!({"messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_openai_error(&v, "invalid_request_error", "invalid_request");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("model"),
        "{v}"
    );

    // A model outside the key's allow-list.
    let (_, limited) = relay
        .create_key(&user_id, serde_json::json!({"allowed_models": ["gpt-5*"]}))
        .await;
    relay.wait_key_active(&limited).await;
    let r = relay
        .post_bare("/v1/chat/completions")
        .bearer_auth(&limited)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_openai_error(
        &r.json().await.unwrap(),
        "permission_error",
        "model_not_allowed",
    );

    assert_eq!(mock.count(), 0, "a refused request reached the upstream");
}

#[tokio::test]
async fn chat_is_served_by_openai_accounts_only() {
    let mock = MockUpstream::start().await;
    let (relay, _, _, key) = relay_with_key(serde_json::json!({})).await;
    // `openai-responses` and `gemini` accounts do not serve Chat Completions (DESIGN §4).
    relay
        .create_account(
            "codex",
            "openai-responses",
            &format!("{}/backend-api/codex", mock.url()),
            OPENAI_SECRET,
        )
        .await;
    relay
        .create_account("gemini", "gemini", &mock.url(), GEMINI_SECRET)
        .await;
    relay.wait_accounts_loaded(2).await;
    let r = relay
        .post_bare("/v1/chat/completions")
        .bearer_auth(&key)
        .json(&chat_body("gpt-4.1", false, chat_conversation("pool", 1)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_openai_error(
        &r.json().await.unwrap(),
        "no_available_account",
        "no_available_account",
    );
    assert_eq!(mock.count(), 0);
}

#[tokio::test]
async fn chat_conversations_stick_and_spread() {
    let mock_a = MockUpstream::start().await;
    let mock_b = MockUpstream::start().await;
    let (relay, _, _, key) = relay_with_key(serde_json::json!({})).await;
    relay
        .create_account(
            "openai-a",
            "openai",
            &format!("{}/v1", mock_a.url()),
            "sk-a",
        )
        .await;
    relay
        .create_account(
            "openai-b",
            "openai",
            &format!("{}/v1", mock_b.url()),
            "sk-b",
        )
        .await;
    relay.wait_accounts_loaded(2).await;
    assert_conversations_stick_and_spread(&mock_a, &mock_b, |topic, turns| {
        relay
            .post_bare("/v1/chat/completions")
            .bearer_auth(&key)
            .json(&chat_body(
                "gpt-4.1",
                turns == 2,
                chat_conversation(topic, turns),
            ))
    })
    .await;
    for r in mock_a.requests().iter().chain(mock_b.requests().iter()) {
        assert_eq!(r.path, "/v1/chat/completions");
    }
}

// ---------------------------------------------------------------------------------------------
// OpenAI Responses
// ---------------------------------------------------------------------------------------------

/// Responses reasoning tokens (inside `output_tokens`).
const RESPONSES_EXTRA: ExtraUsage = ExtraUsage {
    reasoning: 256,
    tool_use: 0,
    web_searches: 0,
};

/// The usage of `openai-responses.stream.sse`: input 5230 of which 4864 cached, output 412 of
/// which 256 reasoning.
const RESPONSES_USAGE: MockUsage = MockUsage {
    input: 5230,
    output: 412,
    cache_write_5m: 0,
    cache_write_1h: 0,
    cache_read: 4864,
};

#[tokio::test]
async fn responses_through_an_openai_account_with_a_path_prefix() {
    let mock = MockUpstream::start().await;
    let (relay, _, _, key) = relay_with_key(serde_json::json!({})).await;
    // Only an `openai` account: it serves Responses too, in the same pool (DESIGN §4).
    let account_id = relay
        .create_account(
            "openai-a",
            "openai",
            &format!("{}/openai", mock.url()),
            OPENAI_SECRET,
        )
        .await;
    relay.wait_accounts_loaded(1).await;
    mock.set(|b| {
        b.usage = RESPONSES_USAGE;
        b.extra_usage = RESPONSES_EXTRA;
        b.upstream_model = Some("gpt-5-2025-08-07".into());
    });

    // `/v1/responses`, JSON, with the openai SDK's body.
    let sdk = ClientFixture::load("sdk-openai-responses.turn1.json");
    let mut json_body = sdk.body.clone();
    json_body["stream"] = false.into();
    let r = relay
        .post_bare("/v1/responses")
        .bearer_auth(&key)
        .header("x-request-id", "responses-json")
        .json(&json_body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["object"], "response", "{v}");
    assert_eq!(v["status"], "completed", "{v}");

    // `/responses` (Codex with a base URL without `/v1`), streamed.
    let r = relay
        .post_bare("/responses")
        .bearer_auth(&key)
        .header("x-request-id", "responses-stream")
        .json(&sdk.body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let text = r.text().await.unwrap();
    let events = sse_events(&text);
    assert_eq!(
        events.first().map(String::as_str),
        Some("response.created"),
        "{text}"
    );
    assert_eq!(
        events.last().map(String::as_str),
        Some("response.completed"),
        "{text}"
    );

    // `/v1/responses/compact` (Codex's remote compaction) keeps its suffix.
    let r = relay
        .post_bare("/v1/responses/compact")
        .bearer_auth(&key)
        .header("x-request-id", "responses-compact")
        .json(&json_body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let _ = r.bytes().await.unwrap();

    let got = mock.requests();
    assert_eq!(got.len(), 3);
    assert_eq!(got[2].path, "/openai/responses/compact");
    for (i, up) in got.iter().enumerate() {
        if i < 2 {
            assert_eq!(up.path, "/openai/responses");
        }
        assert_eq!(
            up.header("authorization"),
            Some(format!("Bearer {OPENAI_SECRET}").as_str())
        );
        assert_eq!(up.header("chatgpt-account-id"), None);
        assert_no_relay_key(up, &key);
    }

    // 5230 − 4864 = 366 uncached input; gpt-5: $1.25 in, $10 out, $0.125 cached per MTok:
    // 366×1.25 + 412×10 + 4864×0.125 = 5185.5 → 5186 (half up).
    let records = relay.wait_records(3).await;
    for (id, stream) in [
        ("responses-json", false),
        ("responses-stream", true),
        ("responses-compact", false),
    ] {
        let rec = record_by_request_id(&records, id);
        assert_eq!(rec["protocol"], "openai_responses", "{rec}");
        assert_eq!(rec["stream"], stream, "{rec}");
        assert_eq!(rec["input_tokens"], 366, "{rec}");
        assert_eq!(rec["cache_read_tokens"], 4864, "{rec}");
        assert_eq!(rec["output_tokens"], 412, "{rec}");
        assert_eq!(rec["reasoning_tokens"], 256, "{rec}");
        assert_eq!(rec["upstream_model"], "gpt-5-2025-08-07", "{rec}");
        assert_eq!(rec["base_cost"], 5186, "{rec}");
        assert_eq!(rec["account_id"], account_id.as_str(), "{rec}");
    }
}

/// OpenAI bills each web search call of a Responses answer: counted from the stream's
/// `response.web_search_call.completed` events, or the JSON answer's `web_search_call` items,
/// and priced by an admin's `web_search` override (the shipped list leaves it unset).
#[tokio::test]
async fn responses_web_searches_are_counted_and_billed_at_the_admins_price() {
    let mock = MockUpstream::start().await;
    let (relay, _, _, key) = relay_with_key(serde_json::json!({})).await;
    relay
        .create_account("openai-a", "openai", &mock.url(), OPENAI_SECRET)
        .await;
    relay.wait_accounts_loaded(1).await;
    mock.set(|b| {
        b.usage = MockUsage::io(1000, 100);
        b.extra_usage.web_searches = 2;
        b.upstream_model = Some("gpt-5-2025-08-07".into());
    });
    let send = |id: &'static str, stream: bool| {
        let body = serde_json::json!({"model": "gpt-5", "stream": stream, "input": format!("search {id}")});
        relay
            .post_bare("/v1/responses")
            .bearer_auth(&key)
            .header("x-request-id", id)
            .json(&body)
            .send()
    };
    // gpt-5 at $1.25 in, $10 out per MTok: 1250 + 1000 = 2250, the searches unpriced.
    for (id, stream) in [("unpriced-json", false), ("unpriced-stream", true)] {
        let r = send(id, stream).await.unwrap();
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await.unwrap();
    }
    let (status, v) = relay
        .admin_post(
            "/api/admin/pricing",
            serde_json::json!({"model": "gpt-5", "input": 1_250_000, "output": 10_000_000,
                               "cache_read": 125_000, "web_search": 10_000}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    // Two searches at 10 000 each on top: 22 250.
    for (id, stream) in [("priced-json", false), ("priced-stream", true)] {
        let r = send(id, stream).await.unwrap();
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await.unwrap();
    }
    let records = relay.wait_records(4).await;
    for (id, stream, base) in [
        ("unpriced-json", false, 2_250),
        ("unpriced-stream", true, 2_250),
        ("priced-json", false, 22_250),
        ("priced-stream", true, 22_250),
    ] {
        let rec = record_by_request_id(&records, id);
        assert_eq!(rec["stream"], stream, "{rec}");
        assert_eq!(rec["web_search_requests"], 2, "{rec}");
        assert_eq!(rec["input_tokens"], 1000, "{rec}");
        assert_eq!(rec["base_cost"], base, "{rec}");
        assert_eq!(rec["unpriced"], false, "{rec}");
    }
}

/// Gemini's Google Search grounding: the distinct queries an answer lists are its searches,
/// billed per query on Gemini 3 and once per grounded prompt on Gemini 2.5 (shipped prices),
/// streamed and whole.
#[tokio::test]
async fn gemini_grounding_searches_are_counted_and_billed() {
    let mock = MockUpstream::start().await;
    let (relay, _, _, key) = relay_with_key(serde_json::json!({})).await;
    gemini_account(&relay, &mock).await;
    relay.wait_accounts_loaded(1).await;
    mock.set(|b| {
        b.usage = MockUsage::io(1000, 100);
        b.extra_usage.web_searches = 3;
    });
    // (request id, model, stream, base cost)
    let cases = [
        // $2 / $12 per MTok: 2 000 + 1 200, + 3 queries × $0.014.
        ("g3-stream", "gemini-3-pro-preview", true, 45_200),
        ("g3-json", "gemini-3-pro-preview", false, 45_200),
        // $1.25 / $10: 1 250 + 1 000, + one grounded prompt at $0.035.
        ("g25-stream", "gemini-2.5-pro", true, 37_250),
        ("g25-json", "gemini-2.5-pro", false, 37_250),
    ];
    for (id, model, stream, _) in cases {
        let method = if stream {
            "streamGenerateContent?alt=sse"
        } else {
            "generateContent"
        };
        let r = relay
            .post_bare(&format!("/v1beta/models/{model}:{method}"))
            .header("x-goog-api-key", &key)
            .header("x-request-id", id)
            .json(&gemini_body(id, 1))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{id}");
        let _ = r.bytes().await.unwrap();
    }
    let records = relay.wait_records(cases.len()).await;
    for (id, _, _, base) in cases {
        let rec = record_by_request_id(&records, id);
        assert_eq!(rec["web_search_requests"], 3, "{id}: {rec}");
        assert_eq!(rec["base_cost"], base, "{id}: {rec}");
    }
}

/// A request the provider served at its priority or flex tier, or Anthropic ran in fast mode,
/// is billed at the model's card for it, and its record names it; an answer naming none is
/// standard.
#[tokio::test]
async fn service_tiers_are_billed_at_their_card_and_recorded() {
    let mock = MockUpstream::start().await;
    let (relay, _, _, key) = relay_with_key(serde_json::json!({})).await;
    openai_account(&relay, &mock).await;
    relay.wait_accounts_loaded(1).await;
    // $5 / $30, priority $12.50 / $75, flex $2.50 / $15 per MTok.
    let (status, v) = relay
        .admin_post(
            "/api/admin/pricing",
            serde_json::json!({"model": "tiered", "input": 5_000_000, "output": 30_000_000,
                "priority": {"input": 12_500_000, "output": 75_000_000},
                "flex": {"input": 2_500_000, "output": 15_000_000}}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["priority"]["input"], 12_500_000, "{v}");
    // (request id, path, stream, the tier the answer names, base cost of 1 000 in, 100 out)
    let cases = [
        (
            "r-priority",
            "/v1/responses",
            true,
            Some("priority"),
            20_000,
        ),
        ("r-flex", "/v1/responses", false, Some("flex"), 4_000),
        (
            "c-priority",
            "/v1/chat/completions",
            false,
            Some("priority"),
            20_000,
        ),
        (
            "c-default",
            "/v1/chat/completions",
            true,
            Some("default"),
            8_000,
        ),
        ("r-unnamed", "/v1/responses", false, None, 8_000),
    ];
    for (id, path, stream, tier, _) in cases {
        mock.set(|b| {
            b.usage = MockUsage::io(1_000, 100);
            b.service_tier = tier.map(str::to_string);
        });
        let body = if path == "/v1/responses" {
            serde_json::json!({"model": "tiered", "stream": stream, "input": id})
        } else {
            chat_body("tiered", stream, chat_conversation(id, 1))
        };
        let r = relay
            .post_bare(path)
            .bearer_auth(&key)
            .header("x-request-id", id)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{id}");
        let _ = r.bytes().await.unwrap();
    }
    // A long prompt at priority on GPT-5.6: the shipped long card's own priority card, 2× the
    // long card ($20 / $90): 300 000 × 20 + 100 × 90 = 6 009 000.
    mock.set(|b| {
        b.usage = MockUsage::io(300_000, 100);
        b.service_tier = Some("priority".into());
    });
    let r = relay
        .post_bare("/v1/responses")
        .bearer_auth(&key)
        .header("x-request-id", "r-long-priority")
        .json(&serde_json::json!({"model": "gpt-5.6", "input": "long"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await.unwrap();
    // A Responses stream asking for priority, cut before its terminal event (the only one
    // naming the tier): estimated, at the tier it asked for, as its cost was held.
    mock.set(|b| {
        b.usage = MockUsage::io(1_000, 100);
        b.service_tier = None;
        b.cut_after = Some(6);
    });
    let r = relay
        .post_bare("/v1/responses")
        .bearer_auth(&key)
        .header("x-request-id", "r-cut-priority")
        .json(
            &serde_json::json!({"model": "tiered", "stream": true, "input": "cut",
            "service_tier": "priority"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await;
    mock.set(|b| b.cut_after = None);
    // Anthropic's fast mode: claude-opus-5-5's shipped fast card is twice its $4 / $20.
    relay
        .create_account("claude-a", "claude", &mock.url(), "sk-ant-a")
        .await;
    relay.wait_accounts_loaded(2).await;
    // 1 000 × 4 + 100 × 20 = 6 000 at standard speed, twice that fast.
    let anthropic = [
        ("a-fast", true, Some("fast"), 12_000),
        ("a-fast-json", false, Some("fast"), 12_000),
        ("a-standard", true, None, 6_000),
    ];
    for (id, stream, speed, _) in anthropic {
        mock.set(|b| {
            b.usage = MockUsage::io(1_000, 100);
            b.service_tier = speed.map(str::to_string);
            b.model = "claude-opus-5-5".into();
        });
        send_message(&relay, &key, id, "claude-opus-5-5", stream).await;
    }
    let records = relay.wait_records(cases.len() + anthropic.len() + 2).await;
    let long = record_by_request_id(&records, "r-long-priority");
    assert_eq!(
        (&long["base_cost"], &long["service_tier"]),
        (
            &serde_json::json!(6_009_000),
            &serde_json::json!("priority")
        ),
        "{long}"
    );
    let cut = record_by_request_id(&records, "r-cut-priority");
    assert_eq!(cut["estimated"], true, "{cut}");
    assert_eq!(cut["service_tier"], "priority", "{cut}");
    let (input, output) = (
        cut["input_tokens"].as_i64().unwrap(),
        cut["output_tokens"].as_i64().unwrap(),
    );
    assert!(input > 0 && output > 0, "{cut}");
    // At the priority card: $12.50 / $75 per MTok, rounded half up.
    let priority_cost = (input * 12_500_000 + output * 75_000_000 + 500_000) / 1_000_000;
    assert_eq!(cut["base_cost"], priority_cost, "{cut}");
    let expected = cases
        .iter()
        .map(|(id, _, _, tier, cost)| (*id, *tier, *cost))
        .chain(
            anthropic
                .iter()
                .map(|(id, _, tier, cost)| (*id, *tier, *cost)),
        );
    for (id, tier, cost) in expected {
        let rec = record_by_request_id(&records, id);
        assert_eq!(rec["base_cost"], cost, "{id}: {rec}");
        let recorded = tier.map(|t| if t == "default" { "standard" } else { t });
        assert_eq!(rec["service_tier"].as_str(), recorded, "{id}: {rec}");
    }
}

/// Claude Code with its advisor: the executor's tokens at its model's prices, the advisor's
/// passes (usage.iterations) at the advisor's, and a compaction pass on top of the answer's
/// counts; streamed and whole.
#[tokio::test]
async fn advisor_and_compaction_passes_are_billed() {
    let mock = MockUpstream::start().await;
    let (relay, _, _, key) = relay_with_key(serde_json::json!({})).await;
    relay
        .create_account("claude-a", "claude", &mock.url(), "sk-ant-a")
        .await;
    relay.wait_accounts_loaded(1).await;
    mock.set(|b| {
        b.usage = MockUsage::io(1_000, 100);
        b.model = "claude-sonnet-5-5".into();
        b.iterations = Some(serde_json::json!([
            {"type": "compaction", "input_tokens": 50_000, "output_tokens": 500},
            {"type": "message", "input_tokens": 1_000, "output_tokens": 100},
            {"type": "advisor_message", "model": "claude-opus-5-5",
             "input_tokens": 5_000, "output_tokens": 1_500},
        ]));
    });
    for (id, stream) in [("advised-stream", true), ("advised-json", false)] {
        send_message(&relay, &key, id, "claude-sonnet-5-5", stream).await;
    }
    let records = relay.wait_records(2).await;
    for id in ["advised-stream", "advised-json"] {
        let rec = record_by_request_id(&records, id);
        // Sonnet 5.5 at $2 / $10: (1 000 + 50 000) × 2 + (100 + 500) × 10 = 108 000;
        // the advisor, Opus 5.5 at $4 / $20: 5 000 × 4 + 1 500 × 20 = 50 000.
        assert_eq!(rec["input_tokens"], 51_000, "{id}: {rec}");
        assert_eq!(rec["output_tokens"], 600, "{id}: {rec}");
        assert_eq!(rec["base_cost"], 158_000, "{id}: {rec}");
        assert_eq!(rec["unpriced"], false, "{id}: {rec}");
        // The advisor's tokens, apart: the pass on another model the cost holds.
        assert_eq!(
            rec["passes"],
            serde_json::json!([{"model": "claude-opus-5-5", "input_tokens": 5_000,
                "output_tokens": 1_500, "cache_write_5m_tokens": 0, "cache_write_1h_tokens": 0,
                "cache_read_tokens": 0}]),
            "{id}: {rec}"
        );
    }
}

/// A background response would run on after the relay's exchange, out of its sight and
/// unbilled: refused with an OpenAI-shaped 400 before it reaches an account.
#[tokio::test]
async fn a_background_response_is_refused() {
    let mock = MockUpstream::start().await;
    let (relay, _, _, key) = relay_with_key(serde_json::json!({})).await;
    openai_account(&relay, &mock).await;
    relay.wait_accounts_loaded(1).await;
    let r = relay
        .post_bare("/v1/responses")
        .bearer_auth(&key)
        .json(&serde_json::json!({"model": "gpt-5", "input": "x", "background": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_openai_error(&v, "invalid_request_error", "invalid_request");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("background")),
        "{v}"
    );
    assert_eq!(mock.count(), 0, "the upstream never saw it");
    // In the foreground it is served.
    let r = relay
        .post_bare("/v1/responses")
        .bearer_auth(&key)
        .json(&serde_json::json!({"model": "gpt-5", "input": "x", "background": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await.unwrap();
    assert_eq!(mock.count(), 1);
}

/// Sends a one-turn Anthropic Messages request with `x-request-id: id` and reads its answer
/// whole, which must be a 200.
async fn send_message(relay: &Relay, key: &str, id: &str, model: &str, stream: bool) {
    let r = relay
        .post("/v1/messages", key)
        .header("x-request-id", id)
        .json(&messages_body(model, stream, conversation(id, 1)))
        .send()
        .await
        .expect("the relay answers");
    assert_eq!(r.status(), 200, "{id}");
    r.bytes().await.expect("the answer reads whole");
}

/// A prompt over a model's long-context threshold (cache reads and writes counted) is billed
/// at the long card, output included; one at the threshold at the standard prices. Streamed
/// and whole answers alike, for the shipped cards of Claude Haiku 5.5 (over 100 000) and
/// Gemini 2.5 Pro (over 200 000, cached content inside the prompt count).
#[tokio::test]
async fn long_prompts_are_billed_at_the_long_context_card() {
    let mock = MockUpstream::start().await;
    let (relay, _, _, key) = relay_with_key(serde_json::json!({})).await;
    relay
        .create_account("claude-a", "claude", &mock.url(), "sk-ant-a")
        .await;
    gemini_account(&relay, &mock).await;
    relay.wait_accounts_loaded(2).await;
    // (request id, stream, usage as the wire reports it, expected base cost)
    let haiku = [
        // 100 000 uncached: $0.10 / $0.50 per MTok: 10 000 + 1 000 × 0.5 = 10 500.
        ("haiku-at", false, MockUsage::io(100_000, 1_000), 10_500),
        // 1 000 uncached + 99 001 read = 100 001: all five times dearer. 1 000 × 0.5
        // + 99 001 × 0.05 + 1 000 × 2.5 = 500 + 4 950.05 + 2 500 → 7 950.
        (
            "haiku-over-stream",
            true,
            MockUsage {
                cache_read: 99_001,
                ..MockUsage::io(1_000, 1_000)
            },
            7_950,
        ),
        // The same prompt as a 5-minute cache write: 500 + 99 001 × 0.625 + 2 500
        // = 64 875.625 → 64 876.
        (
            "haiku-over-write",
            false,
            MockUsage {
                cache_write_5m: 99_001,
                ..MockUsage::io(1_000, 1_000)
            },
            64_876,
        ),
    ];
    for (id, stream, usage, _) in haiku {
        mock.set(|b| {
            b.usage = usage;
            b.model = "claude-haiku-5-5-20261007".into();
        });
        send_message(&relay, &key, id, "claude-haiku-5-5", stream).await;
    }
    // Gemini reports the prompt with its cached part inside: 250 000 of which 50 000 cached
    // is over 200 000. 200 000 × 2.5 + 50 000 × 0.25 + 1 000 × 15 = 527 500. At 200 000 of
    // which 50 000 cached: 150 000 × 1.25 + 50 000 × 0.125 + 1 000 × 10 = 203 750.
    let gemini = [
        ("pro-over", true, 250_000, 527_500),
        ("pro-at", false, 200_000, 203_750),
    ];
    for (id, stream, prompt, _) in gemini {
        mock.set(|b| {
            b.usage = MockUsage {
                cache_read: 50_000,
                ..MockUsage::io(prompt, 1_000)
            };
        });
        let method = if stream {
            "streamGenerateContent?alt=sse"
        } else {
            "generateContent"
        };
        let r = relay
            .post_bare(&format!("/v1beta/models/gemini-2.5-pro:{method}"))
            .header("x-goog-api-key", &key)
            .header("x-request-id", id)
            .json(&serde_json::json!({"contents": [{"role": "user", "parts": [{"text": id}]}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{id}");
        let _ = r.bytes().await.unwrap();
    }
    let records = relay.wait_records(5).await;
    let expected = haiku
        .iter()
        .map(|(id, _, _, cost)| (*id, *cost))
        .chain(gemini.iter().map(|(id, _, _, cost)| (*id, *cost)));
    for (id, cost) in expected {
        let rec = record_by_request_id(&records, id);
        assert_eq!(rec["base_cost"], cost, "{id}: {rec}");
        assert_eq!(rec["billed_cost"], cost, "{id}: {rec}");
        assert_eq!(rec["unpriced"], false, "{id}: {rec}");
    }
}

/// The session id Codex put in `codex-cli.turn{1,2}.json` (headers and body).
const CODEX_SESSION: &str = "01a20188-841c-7b93-8f2e-518885e65f8d";

#[tokio::test]
async fn codex_turns_stick_and_conversations_spread() {
    let mock_a = MockUpstream::start().await;
    let mock_b = MockUpstream::start().await;
    let (relay, _, _, key) = relay_with_key(serde_json::json!({})).await;
    let id_a = relay
        .create_account(
            "codex-a",
            "openai-responses",
            &format!("{}/backend-api/codex", mock_a.url()),
            "sk-proj-upstream-a",
        )
        .await;
    let id_b = relay
        .create_account(
            "codex-b",
            "openai-responses",
            &format!("{}/backend-api/codex", mock_b.url()),
            "sk-proj-upstream-b",
        )
        .await;
    relay.wait_accounts_loaded(2).await;
    for m in [&mock_a, &mock_b] {
        m.set(|b| {
            b.usage = RESPONSES_USAGE;
            b.extra_usage = RESPONSES_EXTRA;
            b.upstream_model = Some("gpt-5.5".into());
        });
    }
    let turn1 = ClientFixture::load("codex-cli.turn1.json");
    let turn2 = ClientFixture::load("codex-cli.turn2.json");
    assert_eq!(turn1.header("session-id"), Some(CODEX_SESSION));
    assert_eq!(turn1.path, "/v1/responses");

    // The captured conversation itself: both turns on one account, sent as Codex sent them.
    let mut first_account = None;
    for (n, t) in [(1, &turn1), (2, &turn2)] {
        let before = (mock_a.count(), mock_b.count());
        let r = t
            .request(&relay, &t.path, &key)
            .header("x-request-id", format!("codex-turn-{n}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
        let text = r.text().await.unwrap();
        assert_eq!(
            sse_events(&text).last().map(String::as_str),
            Some("response.completed"),
            "{text}"
        );
        let on_a = mock_a.count() > before.0;
        let (mock, secret) = if on_a {
            (&mock_a, "sk-proj-upstream-a")
        } else {
            (&mock_b, "sk-proj-upstream-b")
        };
        assert_eq!(
            *first_account.get_or_insert(on_a),
            on_a,
            "turn {n} changed account"
        );
        let up = mock.requests().pop().unwrap();
        assert_eq!(up.path, "/backend-api/codex/responses");
        assert_eq!(
            up.header("authorization"),
            Some(format!("Bearer {secret}").as_str())
        );
        assert_eq!(up.header("session-id"), Some(CODEX_SESSION));
        assert_eq!(up.header("originator"), t.header("originator"));
        assert_eq!(
            up.header("x-codex-turn-metadata"),
            t.header("x-codex-turn-metadata")
        );
        // An API-key account sends no ChatGPT account id.
        assert_eq!(up.header("chatgpt-account-id"), None);
        assert!(
            up.body == t.body_bytes(),
            "turn {n}: Codex body changed upstream"
        );
        assert_no_relay_key(&up, &key);
    }
    // Streamed usage from `response.completed`, exactly. gpt-5.5: $5 in, $30 out, $0.50
    // cached per MTok: 366×5 + 412×30 + 4864×0.5 = 16622.
    let records = relay.wait_records(2).await;
    let expected_account = if first_account == Some(true) {
        &id_a
    } else {
        &id_b
    };
    for id in ["codex-turn-1", "codex-turn-2"] {
        let rec = record_by_request_id(&records, id);
        assert_eq!(rec["stream"], true, "{rec}");
        assert_eq!(rec["requested_model"], "gpt-5.5", "{rec}");
        assert_eq!(rec["input_tokens"], 366, "{rec}");
        assert_eq!(rec["cache_read_tokens"], 4864, "{rec}");
        assert_eq!(rec["output_tokens"], 412, "{rec}");
        assert_eq!(rec["reasoning_tokens"], 256, "{rec}");
        assert_eq!(rec["base_cost"], 16622, "{rec}");
        assert_eq!(rec["account_id"], expected_account.as_str(), "{rec}");
    }

    // Other Codex conversations (a new session id each; older Codex versions send the
    // header as `session_id`): turns stick, conversations spread.
    let mut on_a = 0;
    for c in 0..CONVERSATIONS {
        let session = uuid::Uuid::now_v7().to_string();
        let before = (mock_a.count(), mock_b.count());
        for t in [&turn1, &turn2] {
            let mut t = t.replace_everywhere(CODEX_SESSION, &session);
            if c % 2 == 1 {
                for (k, _) in &mut t.headers {
                    if k == "session-id" {
                        *k = "session_id".into();
                    }
                }
            }
            let r = t
                .request(&relay, "/v1/responses", &key)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let _ = r.bytes().await.unwrap();
        }
        let (da, db) = (mock_a.count() - before.0, mock_b.count() - before.1);
        assert!(
            (da, db) == (2, 0) || (da, db) == (0, 2),
            "Codex conversation {c} split across accounts: {da}/{db}"
        );
        if da == 2 {
            on_a += 1;
        }
    }
    assert!(
        on_a > 0 && on_a < CONVERSATIONS,
        "{CONVERSATIONS} Codex conversations all landed on one account ({on_a} on a)"
    );
}

/// One request written as is on a fresh connection, and the whole answer up to the end of the
/// connection (which the relay must close), as text.
async fn raw_exchange(relay: &Relay, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = relay.proxy.trim_start_matches("http://");
    let mut sock = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the relay");
    sock.write_all(request.as_bytes())
        .await
        .expect("write the request");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut out))
        .await
        .expect("the relay closes the connection after its answer")
        .expect("read the answer");
    String::from_utf8(out).expect("a text answer")
}

/// An answer's status, header fields (lower-case names) and body; its length checked.
fn parse_answer(text: &str) -> (u16, Vec<(String, String)>, serde_json::Value) {
    let (head, body) = text.split_once("\r\n\r\n").expect("a whole head");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1)?.parse().ok())
        .expect("a status line");
    let fields: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').expect("a header field");
            (k.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    let length = fields
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    assert_eq!(length, Some(body.len()), "{text}");
    let body = serde_json::from_str(body).expect("a JSON body");
    (status, fields, body)
}

/// Codex's built-in `openai` provider opens a Responses WebSocket first. A 426 makes it fall
/// back to HTTP at once (any other refusal it retries with backoff, seconds per session); a
/// client without a good key gets its 401 as on HTTP. The connection then closes.
#[tokio::test]
async fn a_responses_websocket_handshake_is_told_to_use_http() {
    let mock = MockUpstream::start().await;
    let (relay, _, _, key) = relay_with_key(serde_json::json!({})).await;
    openai_account(&relay, &mock).await;
    relay.wait_accounts_loaded(1).await;
    let handshake = |path: &str, credential: Option<&str>| {
        let auth = credential
            .map(|k| format!("authorization: Bearer {k}\r\n"))
            .unwrap_or_default();
        format!(
            "GET {path} HTTP/1.1\r\nhost: relay.example\r\nconnection: Upgrade\r\n\
             upgrade: websocket\r\nsec-websocket-version: 13\r\n\
             sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             openai-beta: responses_websockets=2026-02-06\r\n{auth}\r\n"
        )
    };
    for path in ["/v1/responses", "/responses"] {
        let text = raw_exchange(&relay, &handshake(path, Some(&key))).await;
        let (status, fields, body) = parse_answer(&text);
        assert_eq!(status, 426, "{text}");
        assert_openai_error(&body, "invalid_request_error", "websocket_not_supported");
        let field = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(field("connection"), Some("close"), "{text}");
        assert_eq!(field("upgrade"), None, "{text}");
        assert!(field("x-relay-request-id").is_some(), "{text}");
    }
    for credential in [None, Some("sk-relay-unknown")] {
        let text = raw_exchange(&relay, &handshake("/v1/responses", credential)).await;
        let (status, _, body) = parse_answer(&text);
        assert_eq!(status, 401, "{text}");
        assert_openai_error(&body, "authentication_error", "invalid_api_key");
    }
    // A GET of the path without the upgrade is no route.
    let plain = format!(
        "GET /v1/responses HTTP/1.1\r\nhost: relay.example\r\nauthorization: Bearer {key}\r\n\r\n"
    );
    let text = raw_exchange(&relay, &plain).await;
    assert_eq!(parse_answer(&text).0, 404, "{text}");
    assert_eq!(mock.count(), 0, "a handshake reached the upstream");

    // Codex's fallback: the same turn over HTTP.
    let turn1 = ClientFixture::load("codex-cli.turn1.json");
    let r = turn1
        .request_as_captured(&relay, &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let _ = r.bytes().await.unwrap();
    assert_eq!(mock.count(), 1);
}

#[tokio::test]
async fn chatgpt_token_sends_chatgpt_account_id() {
    let mock = MockUpstream::start().await;
    let (relay, _, _, key) = relay_with_key(serde_json::json!({})).await;
    let token = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJ0ZXN0In0.c2lnbmF0dXJl";
    relay
        .create_account_with(serde_json::json!({
            "name": "chatgpt",
            "type": "openai-responses",
            "base_url": format!("{}/backend-api/codex", mock.url()),
            "credential": token,
            "chatgpt_account_id": "9f8e7d6c-chatgpt-account",
        }))
        .await;
    relay.wait_accounts_loaded(1).await;
    let turn1 = ClientFixture::load("codex-cli-root-base-url.turn1.json");
    assert_eq!(turn1.path, "/responses");
    let r = turn1
        .request(&relay, "/responses", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let _ = r.bytes().await.unwrap();
    let got = mock.requests();
    assert_eq!(got.len(), 1);
    let up = &got[0];
    assert_eq!(up.path, "/backend-api/codex/responses");
    assert_eq!(
        up.header("authorization"),
        Some(format!("Bearer {token}").as_str())
    );
    assert_eq!(
        up.header("chatgpt-account-id"),
        Some("9f8e7d6c-chatgpt-account")
    );
    assert_no_relay_key(up, &key);
}

/// The ChatGPT Codex backend answers streamed Responses calls only (`400 {"detail":"Stream
/// must be set to true"}` otherwise): a call without a stream goes to an API-key account for
/// that one request, and the conversation stays on its ChatGPT account.
#[tokio::test]
async fn a_responses_call_without_a_stream_never_reaches_a_chatgpt_account() {
    let chatgpt_mock = MockUpstream::start().await;
    let api_mock = MockUpstream::start().await;
    chatgpt_mock.set(|b| b.streams_only = true);
    let (relay, _, _, key) = relay_with_key(serde_json::json!({})).await;
    let token = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJ0ZXN0In0.c2lnbmF0dXJl";
    relay
        .create_account_with(serde_json::json!({
            "name": "chatgpt", "type": "openai-responses", "priority": 10,
            "base_url": format!("{}/backend-api/codex", chatgpt_mock.url()),
            "credential": token, "chatgpt_account_id": "9f8e7d6c-chatgpt-account",
        }))
        .await;
    relay.wait_accounts_loaded(1).await;
    let turn1 = ClientFixture::load("sdk-openai-responses.turn1.json");
    let turn2 = ClientFixture::load("sdk-openai-responses.turn2.json");
    assert!(turn1.stream && !turn2.stream);
    assert_eq!(
        turn1.body["prompt_cache_key"],
        turn2.body["prompt_cache_key"]
    );

    // Only the ChatGPT account: the client is told why nothing serves it.
    let r = turn2
        .request_as_captured(&relay, &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_openai_error(&v, "no_available_account", "no_available_account");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("\"stream\": true"), "{message}");
    assert_eq!(chatgpt_mock.count(), 0);

    relay
        .create_account_with(serde_json::json!({
            "name": "api", "type": "openai", "priority": 50,
            "base_url": format!("{}/v1", api_mock.url()), "credential": OPENAI_SECRET,
        }))
        .await;
    relay.wait_accounts_loaded(2).await;
    let send = |fx: &ClientFixture| {
        let r = fx.request_as_captured(&relay, &key).send();
        async move {
            let r = r.await.unwrap();
            let status = r.status();
            let text = r.text().await.unwrap();
            assert_eq!(status, 200, "{text}");
            text
        }
    };
    // Turn 1 streams: the preferred ChatGPT account, which the conversation is bound to.
    let text = send(&turn1).await;
    assert!(text.contains("response.completed"), "{text}");
    assert_eq!((chatgpt_mock.count(), api_mock.count()), (1, 0));
    // Turn 2 wants one JSON answer: the API-key account serves it.
    let text = send(&turn2).await;
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["object"], "response", "{v}");
    assert_eq!((chatgpt_mock.count(), api_mock.count()), (1, 1));
    let up = &api_mock.requests()[0];
    assert_eq!(up.path, "/v1/responses");
    assert_eq!(up.header("chatgpt-account-id"), None);
    // The conversation is still the ChatGPT account's: a streamed turn goes back there, and
    // so does a compaction, which that backend answers as JSON.
    let _ = send(&turn1).await;
    assert_eq!((chatgpt_mock.count(), api_mock.count()), (2, 1));
    let r = relay
        .post_bare("/v1/responses/compact")
        .bearer_auth(&key)
        .json(&turn2.body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    assert_eq!((chatgpt_mock.count(), api_mock.count()), (3, 1));
    assert!(chatgpt_mock
        .requests()
        .iter()
        .all(|q| q.path.ends_with("/compact") || q.json()["stream"] == true));
}

#[tokio::test]
async fn previous_response_id_returns_to_its_account() {
    let mock_a = MockUpstream::start().await;
    let mock_b = MockUpstream::start().await;
    let (relay, _, _, key) = relay_with_key(serde_json::json!({})).await;
    relay
        .create_account("codex-a", "openai-responses", &mock_a.url(), "sk-a")
        .await;
    relay
        .create_account("codex-b", "openai-responses", &mock_b.url(), "sk-b")
        .await;
    relay.wait_accounts_loaded(2).await;
    for i in 0..8 {
        let r = relay
            .post_bare("/v1/responses")
            .bearer_auth(&key)
            .json(&serde_json::json!({
                "model": "gpt-5", "instructions": format!("first {i}"), "input": "hello",
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = r.json().await.unwrap();
        let response_id = v["id"].as_str().unwrap().to_string();
        let before_a = mock_a.count();
        // Different instructions: only previous_response_id ties this request to the first.
        let r = relay
            .post_bare("/v1/responses")
            .bearer_auth(&key)
            .json(&serde_json::json!({
                "model": "gpt-5", "instructions": format!("other {i}"), "input": "more",
                "previous_response_id": response_id,
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let served_by_a = mock_a.count() > before_a;
        let produced_by_a = mock_a
            .requests()
            .iter()
            .any(|q| q.json()["instructions"] == format!("first {i}"));
        assert_eq!(
            served_by_a, produced_by_a,
            "round {i}: previous_response_id {response_id} went to the other account"
        );
    }
}

#[tokio::test]
async fn a_continued_response_is_known_while_it_streams_and_never_goes_elsewhere() {
    let mocks = [MockUpstream::start().await, MockUpstream::start().await];
    let gate = Arc::new(tokio::sync::Notify::new());
    for m in &mocks {
        let gate = gate.clone();
        m.set(|b| b.second_event_gate = Some(gate));
    }
    let (relay, _, _, key) = relay_with_key(serde_json::json!({})).await;
    relay
        .create_account("codex-a", "openai-responses", &mocks[0].url(), "sk-a")
        .await;
    relay
        .create_account("codex-b", "openai-responses", &mocks[1].url(), "sk-b")
        .await;
    relay.wait_accounts_loaded(2).await;
    let continued = |id: &str, tag: &str| {
        relay
            .post_bare("/v1/responses")
            .bearer_auth(&key)
            .json(&serde_json::json!({
                "model": "gpt-5", "instructions": tag, "input": "more",
                "previous_response_id": id,
            }))
            .send()
    };

    // A streamed answer, held after its first event (`response.created`, naming its id).
    let mut stream = relay
        .post_bare("/v1/responses")
        .bearer_auth(&key)
        .json(&serde_json::json!({
            "model": "gpt-5", "instructions": "first", "input": "hello", "stream": true,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut seen = Vec::new();
    let response_id = loop {
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.chunk())
            .await
            .expect("the first event")
            .unwrap()
            .expect("more of the stream");
        seen.extend_from_slice(&chunk);
        let text = String::from_utf8_lossy(&seen);
        if let Some(at) = text.find("\"id\":\"resp_") {
            let id = &text[at + 6..];
            break id[..id.find('"').unwrap()].to_string();
        }
    };
    let producer = usize::from(mocks[1].count() == 1);
    let other = 1 - producer;
    // Next turns, sent while the first still streams (each of another session, so only the
    // response id ties them to it), go to the account holding it.
    for i in 0..8 {
        let r = continued(&response_id, &format!("while streaming {i}"))
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    }
    assert_eq!(
        mocks[producer].count(),
        9,
        "a continued turn went elsewhere"
    );
    assert_eq!(mocks[other].count(), 0);
    gate.notify_one();
    gate.notify_one();
    let rest = stream.bytes().await.unwrap();
    assert!(String::from_utf8_lossy(&rest).contains("response.completed"));

    // The account answers 429: the client gets it, no other account is tried (none knows
    // the response).
    mocks[producer].set(|b| {
        b.status = 429;
        b.error_body = r#"{"error":{"type":"rate_limit_exceeded","message":"slow down"}}"#.into();
        b.extra_headers = vec![("retry-after".into(), "120".into())];
    });
    let r = continued(&response_id, "rate limited").await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(mocks[producer].count(), 10);
    assert_eq!(mocks[other].count(), 0, "a continued turn failed over");
    // While the account cools down, the relay says when to come back.
    let r = continued(&response_id, "cooling").await.unwrap();
    assert_eq!(r.status(), 429);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((100..=120).contains(&wait), "retry-after {wait}");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_openai_error(&v, "rate_limit_error", "rate_limit_exceeded");
    assert_eq!(mocks[producer].count(), 10);
    assert_eq!(mocks[other].count(), 0);
}

// ---------------------------------------------------------------------------------------------
// Gemini
// ---------------------------------------------------------------------------------------------

/// How a Gemini answer comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `:generateContent`: one JSON object.
    Json,
    /// `:streamGenerateContent?alt=sse`: SSE chunks.
    Sse,
    /// `:streamGenerateContent` without `alt=sse`: one JSON array of chunks.
    Array,
}

/// Gemini thoughts and search-grounding prompt tokens.
const GEMINI_EXTRA: ExtraUsage = ExtraUsage {
    reasoning: 734,
    tool_use: 312,
    web_searches: 0,
};

/// Gemini usage as `gemini.stream.sse` reports it, plus search grounding: prompt 4120 of which
/// 2048 cached, candidates 211, thoughts 734, tool-use prompt 312.
const GEMINI_USAGE: MockUsage = MockUsage {
    input: 4120,
    output: 211,
    cache_write_5m: 0,
    cache_write_1h: 0,
    cache_read: 2048,
};

#[tokio::test]
async fn gemini_keys_are_swapped_aliases_route_and_thoughts_are_billed() {
    let mock = MockUpstream::start().await;
    let (relay, _, _, key) = relay_with_key(serde_json::json!({})).await;
    let account_id = gemini_account(&relay, &mock).await;
    relay.wait_accounts_loaded(1).await;
    mock.set(|b| {
        b.usage = GEMINI_USAGE;
        b.extra_usage = GEMINI_EXTRA;
    });
    let sdk = ClientFixture::load("sdk-gemini.turn1.json");
    let model_path = "/v1beta/models/gemini-2.5-flash";
    let upstream_json = format!("{model_path}:generateContent");
    let upstream_stream = format!("{model_path}:streamGenerateContent?alt=sse");

    // (request id, client path, key in header?, expected upstream path, answer shape)
    let cases = [
        (
            "g-header",
            format!("{model_path}:generateContent"),
            true,
            upstream_json.clone(),
            Shape::Json,
        ),
        (
            "g-query",
            format!("{model_path}:generateContent?key={key}"),
            false,
            upstream_json.clone(),
            Shape::Json,
        ),
        (
            "g-stream",
            format!("{model_path}:streamGenerateContent?alt=sse&key={key}"),
            false,
            upstream_stream.clone(),
            Shape::Sse,
        ),
        (
            "g-array",
            format!("{model_path}:streamGenerateContent"),
            true,
            format!("{model_path}:streamGenerateContent"),
            Shape::Array,
        ),
        (
            "g-v1-alias",
            "/v1/models/gemini-2.5-flash:generateContent".to_string(),
            true,
            upstream_json.clone(),
            Shape::Json,
        ),
        (
            "g-prefix-alias",
            "/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse".to_string(),
            true,
            upstream_stream.clone(),
            Shape::Sse,
        ),
    ];
    for (i, (id, path, key_in_header, upstream_path, shape)) in cases.iter().enumerate() {
        let mut rb = relay
            .post_bare(path)
            .header("content-type", "application/json")
            .header(
                "x-goog-api-client",
                sdk.header("x-goog-api-client").unwrap(),
            )
            .header("x-request-id", *id);
        if *key_in_header {
            rb = rb.header("x-goog-api-key", &key);
        }
        let r = rb.json(&sdk.body).send().await.unwrap();
        assert_eq!(
            r.status(),
            200,
            "{id}: {}",
            r.text().await.unwrap_or_default()
        );
        let content_type = r.headers()["content-type"].to_str().unwrap().to_string();
        let text = r.text().await.unwrap();
        let chunks: Vec<serde_json::Value> = match shape {
            Shape::Sse => {
                assert!(
                    content_type.starts_with("text/event-stream"),
                    "{id}: {content_type}"
                );
                sse_data(&text)
                    .iter()
                    .map(|d| serde_json::from_str(d).unwrap())
                    .collect()
            }
            Shape::Array => serde_json::from_str(&text).unwrap(),
            Shape::Json => vec![serde_json::from_str(&text).unwrap()],
        };
        let last = chunks.last().unwrap();
        assert_eq!(
            chunks.len(),
            if *shape == Shape::Json { 1 } else { 3 },
            "{id}: {text}"
        );
        assert_eq!(
            last["candidates"][0]["finishReason"], "STOP",
            "{id}: {text}"
        );
        assert_eq!(
            last["usageMetadata"]["candidatesTokenCount"], 211,
            "{id}: {text}"
        );
        assert_eq!(
            last["usageMetadata"]["thoughtsTokenCount"], 734,
            "{id}: {text}"
        );
        let up = &mock.requests()[i];
        assert_eq!(&up.path, upstream_path, "{id}");
        assert_eq!(up.header("x-goog-api-key"), Some(GEMINI_SECRET), "{id}");
        assert_eq!(up.header("authorization"), None, "{id}");
        assert_eq!(up.header("x-api-key"), None, "{id}");
        assert!(
            !up.query()
                .unwrap_or("")
                .split('&')
                .any(|kv| kv.starts_with("key=")),
            "{id}: key query parameter forwarded: {}",
            up.path
        );
        assert_eq!(
            up.header("x-goog-api-client"),
            sdk.header("x-goog-api-client"),
            "{id}"
        );
        assert!(
            up.body == serde_json::to_vec(&sdk.body).unwrap(),
            "{id}: body changed"
        );
        assert_no_relay_key(up, &key);
    }

    // input = 4120 − 2048 + 312 = 2384; output = 211 + 734 thoughts = 945; gemini-2.5-flash:
    // $0.30 in, $2.50 out, $0.03 cached per MTok: 715.2 + 2362.5 + 61.44 = 3139.14 → 3139.
    let records = relay.wait_records(cases.len()).await;
    for (id, _, _, _, shape) in &cases {
        let rec = record_by_request_id(&records, id);
        assert_eq!(rec["protocol"], "gemini", "{rec}");
        assert_eq!(rec["stream"], *shape != Shape::Json, "{rec}");
        assert_eq!(rec["requested_model"], "gemini-2.5-flash", "{rec}");
        assert_eq!(rec["input_tokens"], 2384, "{rec}");
        assert_eq!(rec["output_tokens"], 945, "{rec}");
        assert_eq!(rec["reasoning_tokens"], 734, "{rec}");
        assert_eq!(rec["cache_read_tokens"], 2048, "{rec}");
        assert_eq!(rec["base_cost"], 3139, "{rec}");
        assert_eq!(rec["account_id"], account_id.as_str(), "{rec}");
    }
}

/// google-genai's `models.count_tokens`: routed to a gemini account like a generation, the
/// upstream's count passed through, and booked without cost, as Anthropic's `count_tokens`.
#[tokio::test]
async fn gemini_count_tokens_reaches_a_gemini_account_and_is_not_billed() {
    let mock = MockUpstream::start().await;
    let (relay, _, _, key) = relay_with_key(serde_json::json!({})).await;
    let account_id = gemini_account(&relay, &mock).await;
    relay.wait_accounts_loaded(1).await;
    mock.set(|b| b.usage = MockUsage::io(31, 0));
    let sdk = ClientFixture::load("sdk-gemini.turn1.json");
    let body = serde_json::json!({"contents": sdk.body["contents"]});
    // (request id, client path, key in the header or the query)
    let cases = [
        (
            "count-v1beta",
            "/v1beta/models/gemini-2.5-flash:countTokens".to_string(),
            true,
        ),
        (
            "count-v1",
            "/v1/models/gemini-2.5-flash:countTokens".to_string(),
            true,
        ),
        (
            "count-prefix",
            format!("/gemini/v1beta/models/gemini-2.5-flash:countTokens?key={key}"),
            false,
        ),
    ];
    for (id, path, in_header) in &cases {
        let mut rb = relay
            .post_bare(path)
            .header("x-request-id", *id)
            .json(&body);
        if *in_header {
            rb = rb.header("x-goog-api-key", &key);
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["totalTokens"], 31, "{path}: {v}");
    }
    let got = mock.requests();
    assert_eq!(got.len(), cases.len());
    for up in &got {
        assert_eq!(up.path, "/v1beta/models/gemini-2.5-flash:countTokens");
        assert_eq!(up.header("x-goog-api-key"), Some(GEMINI_SECRET));
        assert_eq!(up.json(), body);
        assert_no_relay_key(up, &key);
    }
    let records = relay.wait_records(cases.len()).await;
    for (id, _, _) in &cases {
        let rec = record_by_request_id(&records, id);
        assert_eq!(rec["protocol"], "gemini", "{rec}");
        assert_eq!(rec["status"], 200, "{rec}");
        assert_eq!(rec["account_id"], account_id.as_str(), "{rec}");
        assert_eq!(rec["requested_model"], "gemini-2.5-flash", "{rec}");
        assert_eq!(rec["input_tokens"], 0, "{rec}");
        assert_eq!(rec["base_cost"], 0, "{rec}");
        assert_eq!(rec["billed_cost"], 0, "{rec}");
        assert_eq!(rec["estimated"], false, "{rec}");
    }
}

#[tokio::test]
async fn gemini_errors_have_gemini_shape() {
    let mock = MockUpstream::start().await;
    let (relay, user_id, _, key) = relay_with_key(serde_json::json!({})).await;
    gemini_account(&relay, &mock).await;
    relay.wait_accounts_loaded(1).await;
    let path = "/v1beta/models/gemini-2.5-flash:generateContent";
    let body = gemini_body("errors", 1);

    // No key.
    let r = relay.post_bare(path).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_gemini_error(&r.json().await.unwrap(), 401, "UNAUTHENTICATED");

    // An unknown key, in the query as the SDKs' REST examples do.
    let r = relay
        .post_bare(&format!("{path}?key=sk-relay-not-a-real-key"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_gemini_error(&r.json().await.unwrap(), 401, "UNAUTHENTICATED");

    // Malformed JSON.
    let r = relay
        .post_bare(path)
        .header("x-goog-api-key", &key)
        .header("content-type", "application/json")
        .body("{\"contents\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_gemini_error(&r.json().await.unwrap(), 400, "INVALID_ARGUMENT");

    // A key limited to Claude models; and one limited to gemini-2.5-flash, which an allowed
    // model named in the body does not let ask the path for another (the path names the
    // model the upstream runs).
    let mut with_model = body.clone();
    with_model["model"] = "gemini-2.5-flash".into();
    for (allowed, path, body) in [
        ("claude-*", path, &body),
        (
            "gemini-2.5-flash",
            "/v1beta/models/gemini-2.5-pro:generateContent",
            &with_model,
        ),
    ] {
        let (_, limited) = relay
            .create_key(&user_id, serde_json::json!({"allowed_models": [allowed]}))
            .await;
        relay.wait_key_active(&limited).await;
        let r = relay
            .post_bare(path)
            .header("x-goog-api-key", &limited)
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{allowed} {path}");
        assert_gemini_error(&r.json().await.unwrap(), 403, "PERMISSION_DENIED");
    }

    // A compressed body is refused before it is read, in Gemini's shape.
    let r = relay
        .post_bare(path)
        .header("x-goog-api-key", &key)
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_gemini_error(&v, 415, "INVALID_ARGUMENT");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("gzip"),
        "{v}"
    );

    assert_eq!(mock.count(), 0, "a refused request reached the upstream");
}

#[tokio::test]
async fn gemini_conversations_stick_and_spread() {
    let mock_a = MockUpstream::start().await;
    let mock_b = MockUpstream::start().await;
    let (relay, _, _, key) = relay_with_key(serde_json::json!({})).await;
    relay
        .create_account("gemini-a", "gemini", &mock_a.url(), "AIza-a")
        .await;
    relay
        .create_account("gemini-b", "gemini", &mock_b.url(), "AIza-b")
        .await;
    relay.wait_accounts_loaded(2).await;
    assert_conversations_stick_and_spread(&mock_a, &mock_b, |topic, turns| {
        // Turn 1 as JSON, turn 2 streamed: the session key ignores the method.
        let method = if turns == 1 {
            "generateContent"
        } else {
            "streamGenerateContent?alt=sse"
        };
        relay
            .post_bare(&format!("/v1beta/models/gemini-2.5-flash:{method}"))
            .header("x-goog-api-key", &key)
            .json(&gemini_body(topic, turns))
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Model listing
// ---------------------------------------------------------------------------------------------

/// `GET /v1/models` names what a key can be served: models of accounts in operation (an
/// account that serves every model serves the price table's models of its platform), on
/// platforms the key may use, that the key may call; in the OpenAI shape, or Anthropic's when
/// `anthropic-version` is sent (its Messages API serves Claude models only).
#[tokio::test]
async fn model_list_names_what_the_key_can_be_served() {
    let mock = MockUpstream::start().await;
    let (relay, user_id, _, open_key) = relay_with_key(serde_json::json!({})).await;
    relay
        .create_account_with(serde_json::json!({
            "name": "openai-a", "type": "openai", "base_url": mock.url(),
            "credential": OPENAI_SECRET, "models": ["gpt-custom-1"],
        }))
        .await;
    relay
        .create_account("claude-a", "claude", &mock.url(), "sk-ant-upstream")
        .await;
    gemini_account(&relay, &mock).await;
    relay.wait_accounts_loaded(3).await;
    let (_, claude_key) = relay
        .create_key(
            &user_id,
            serde_json::json!({"allowed_models": ["claude-*"]}),
        )
        .await;
    let (_, no_claude_key) = relay
        .create_key(
            &user_id,
            serde_json::json!({"allowed_platforms": ["openai", "gemini"]}),
        )
        .await;
    relay.wait_key_active(&claude_key).await;
    relay.wait_key_active(&no_claude_key).await;

    let get = |path: &str, headers: &[(&str, &str)]| {
        let mut rb = relay.http.get(format!("{}{path}", relay.proxy));
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        async move {
            let r = rb.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    let ids = |v: &serde_json::Value| {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let bearer = |key: &str| format!("Bearer {key}");

    let (status, v) = get("/v1/models", &[("authorization", &bearer(&open_key))]).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "list", "{v}");
    let all = ids(&v);
    for m in ["claude-sonnet-4-5", "gemini-2.5-flash", "gpt-custom-1"] {
        assert!(all.iter().any(|x| x == m), "{m} missing from {all:?}");
    }
    // Priced, but the only openai account serves its own model alone.
    assert!(!all.iter().any(|x| x == "gpt-4.1"), "{all:?}");
    let sonnet = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "claude-sonnet-4-5")
        .unwrap();
    assert_eq!(sonnet["object"], "model");
    assert_eq!(sonnet["owned_by"], "anthropic");

    let (_, v) = get("/v1/models", &[("authorization", &bearer(&claude_key))]).await;
    let claude = ids(&v);
    assert!(
        !claude.is_empty() && claude.iter().all(|m| m.starts_with("claude-")),
        "{claude:?}"
    );
    let (_, v) = get("/v1/models", &[("authorization", &bearer(&no_claude_key))]).await;
    let no_claude = ids(&v);
    assert!(
        no_claude.iter().any(|m| m == "gpt-custom-1"),
        "{no_claude:?}"
    );
    assert!(
        !no_claude.iter().any(|m| m.starts_with("claude-")),
        "{no_claude:?}"
    );

    // The anthropic SDK's `models.list()` / `retrieve()`.
    let anthropic = [
        ("x-api-key", open_key.as_str()),
        ("anthropic-version", "2023-06-01"),
    ];
    let (status, v) = get("/v1/models", &anthropic).await;
    assert_eq!(status, 200, "{v}");
    let listed = ids(&v);
    assert!(listed.iter().any(|m| m == "claude-sonnet-4-5"), "{v}");
    assert!(listed.iter().all(|m| m.starts_with("claude-")), "{v}");
    assert_eq!(v["has_more"], false, "{v}");
    assert_eq!(v["first_id"], v["data"][0]["id"], "{v}");
    assert_eq!(v["last_id"], listed.last().unwrap().as_str(), "{v}");
    for m in v["data"].as_array().unwrap() {
        assert_eq!(m["type"], "model", "{m}");
        assert_eq!(m["display_name"], m["id"], "{m}");
        assert_eq!(m["created_at"], "1970-01-01T00:00:00Z", "{m}");
    }
    let (status, v) = get("/v1/models/claude-sonnet-4-5", &anthropic).await;
    assert_eq!(
        (status, &v["id"], &v["type"]),
        (200, &"claude-sonnet-4-5".into(), &"model".into())
    );
    let (status, v) = get("/v1/models/gpt-custom-1", &anthropic).await;
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], "not_found_error", "{v}");

    let (status, v) = get("/v1/models", &[]).await;
    assert_eq!(status, 401);
    assert_openai_error(&v, "authentication_error", "invalid_api_key");
    let (status, v) = get("/v1/models", &[("anthropic-version", "2023-06-01")]).await;
    assert_eq!(status, 401);
    assert_eq!(v["error"]["type"], "authentication_error", "{v}");
    assert_eq!(v["type"], "error", "{v}");
}

/// google-genai's `models.list()` and `models.get()`: the Gemini models the key can be served,
/// in Gemini's shape, with Gemini's ways of sending the key.
#[tokio::test]
async fn gemini_model_list_and_lookup() {
    let mock = MockUpstream::start().await;
    let (relay, _, _, key) = relay_with_key(serde_json::json!({})).await;
    relay
        .create_account_with(serde_json::json!({
            "name": "gemini-a", "type": "gemini", "base_url": mock.url(),
            "credential": GEMINI_SECRET, "models": ["gemini-2.5-flash", "gemini-2.5-pro"],
        }))
        .await;
    relay
        .create_account("claude-a", "claude", &mock.url(), "sk-ant-upstream")
        .await;
    relay.wait_accounts_loaded(2).await;
    let get = |path: String, goog_header: Option<&str>| {
        let mut rb = relay.http.get(format!("{}{path}", relay.proxy));
        if let Some(k) = goog_header {
            rb = rb.header("x-goog-api-key", k);
        }
        async move {
            let r = rb.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    for (path, header) in [
        ("/v1beta/models".to_string(), Some(key.as_str())),
        (format!("/v1beta/models?key={key}&pageSize=50"), None),
        ("/gemini/v1beta/models".to_string(), Some(key.as_str())),
        // google-genai with API version v1.
        ("/v1/models".to_string(), Some(key.as_str())),
    ] {
        let (status, v) = get(path.clone(), header).await;
        assert_eq!(status, 200, "{path}: {v}");
        let names: Vec<&str> = v["models"]
            .as_array()
            .unwrap_or_else(|| panic!("{path}: {v}"))
            .iter()
            .map(|m| m["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["models/gemini-2.5-flash", "models/gemini-2.5-pro"],
            "{path}"
        );
        let flash = &v["models"][0];
        assert_eq!(flash["displayName"], "gemini-2.5-flash");
        for method in ["generateContent", "countTokens"] {
            assert!(
                flash["supportedGenerationMethods"]
                    .as_array()
                    .unwrap()
                    .contains(&method.into()),
                "{flash}"
            );
        }
    }
    let (status, v) = get("/v1beta/models/gemini-2.5-pro".into(), Some(&key)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["name"], "models/gemini-2.5-pro");
    let (status, v) = get(format!("/v1beta/models/gemini-2.5-flash?key={key}"), None).await;
    assert_eq!(
        (status, &v["name"]),
        (200, &"models/gemini-2.5-flash".into())
    );
    for unknown in ["gemini-1.0-pro", "claude-sonnet-4-5"] {
        let (status, v) = get(format!("/v1beta/models/{unknown}"), Some(&key)).await;
        assert_eq!(status, 404, "{v}");
        assert_gemini_error(&v, 404, "NOT_FOUND");
    }
    let (status, v) = get("/v1beta/models".into(), None).await;
    assert_eq!(status, 401);
    assert_gemini_error(&v, 401, "UNAUTHENTICATED");
    let (status, v) = get("/v1beta/models".into(), Some("sk-relay-unknown")).await;
    assert_eq!(status, 401);
    assert_gemini_error(&v, 401, "UNAUTHENTICATED");
}

/// The upstream's `x-request-id` (what the openai SDK reports as `_request_id` and Codex in its
/// errors, the id OpenAI's logs know) reaches the client; the relay's own id, which names the
/// usage record, comes in `x-relay-request-id`, on its own refusals too.
#[tokio::test]
async fn the_upstreams_request_id_is_kept_and_the_relays_comes_apart() {
    let mock = MockUpstream::start().await;
    let (relay, _, _, key) = relay_with_key(serde_json::json!({})).await;
    openai_account(&relay, &mock).await;
    gemini_account(&relay, &mock).await;
    relay.wait_accounts_loaded(2).await;
    let ids = |r: &reqwest::Response| {
        let get = |h: &str| r.headers().get(h).map(|v| v.to_str().unwrap().to_string());
        (
            get("x-request-id"),
            get("x-relay-request-id").expect("x-relay-request-id"),
        )
    };

    // A Responses stream, no id from the client: OpenAI's id back, the relay's went upstream.
    let r = relay
        .post_bare("/v1/responses")
        .bearer_auth(&key)
        .json(&serde_json::json!({"model": "gpt-5", "input": "hi", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (answered, streamed_relay_id) = ids(&r);
    let _ = r.text().await.unwrap();
    let up = mock.requests().pop().unwrap();
    assert_eq!(
        answered.as_deref(),
        Some(format!("req_mock_{}_1", mock.port).as_str())
    );
    assert_eq!(up.header("x-request-id"), Some(streamed_relay_id.as_str()));

    // An upstream error answer keeps the upstream's id too.
    mock.set(|b| {
        b.status = 400;
        b.error_body = r#"{"error":{"message":"Unknown parameter: 'x'.","type":"invalid_request_error","param":"x","code":"unknown_parameter"}}"#.into();
    });
    let r = relay
        .post_bare("/v1/chat/completions")
        .bearer_auth(&key)
        .header("x-request-id", "client-7")
        .json(&chat_body("gpt-4.1", false, chat_conversation("bad", 1)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let (answered, failed_relay_id) = ids(&r);
    assert_eq!(
        answered.as_deref(),
        Some(format!("req_mock_{}_2", mock.port).as_str())
    );
    assert_eq!(mock.requests()[1].header("x-request-id"), Some("client-7"));
    mock.set(|b| b.status = 200);

    // Gemini names no request: the client's own id is echoed, else the relay's.
    let mut echoed = Vec::new();
    for client_id in [Some("client-8"), None] {
        let mut rb = relay
            .post_bare("/v1beta/models/gemini-2.5-flash:generateContent")
            .header("x-goog-api-key", &key)
            .json(&gemini_body("ids", 1));
        if let Some(id) = client_id {
            rb = rb.header("x-request-id", id);
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), 200);
        let (answered, relay_id) = ids(&r);
        assert_eq!(answered.unwrap(), client_id.unwrap_or(&relay_id));
        let _ = r.bytes().await.unwrap();
    }

    // An upstream that only echoes the id it was sent names no request of its own: the record
    // keeps no provider id (the client's and the relay's are there already).
    mock.set(|b| b.echo_request_id = true);
    for client_id in [Some("client-echo"), None] {
        let mut rb = relay
            .post_bare("/v1/chat/completions")
            .bearer_auth(&key)
            .json(&chat_body("gpt-4.1", false, chat_conversation("echo", 1)));
        if let Some(id) = client_id {
            rb = rb.header("x-request-id", id);
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), 200);
        let (answered, relay_id) = ids(&r);
        assert_eq!(answered.unwrap(), client_id.unwrap_or(&relay_id));
        let _ = r.bytes().await.unwrap();
        echoed.push(relay_id);
    }
    mock.set(|b| b.echo_request_id = false);

    // The relay's own refusal: the client's id echoed, the relay's beside it.
    let r = relay
        .post_bare("/v1/chat/completions")
        .bearer_auth("sk-relay-unknown")
        .header("x-request-id", "client-9")
        .json(&chat_body("gpt-4.1", false, chat_conversation("no key", 1)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let (answered, relay_id) = ids(&r);
    assert_eq!(answered.as_deref(), Some("client-9"));
    assert_ne!(relay_id, "client-9");

    // The relay's id names the record; the client's is kept in it, and so are the provider's
    // id of the request and of its answer.
    let records = relay.wait_records(4).await;
    let rec = record_by_id(&records, &streamed_relay_id);
    assert_eq!(rec["protocol"], "openai_responses", "{rec}");
    let port = mock.port;
    assert_eq!(
        (&rec["upstream_request_id"], &rec["response_id"]),
        (
            &serde_json::json!(format!("req_mock_{port}_1")),
            &serde_json::json!(format!("resp_mock_{port}_1"))
        ),
        "{rec}"
    );
    let rec = record_by_id(&records, &failed_relay_id);
    assert_eq!(rec["request_id"], "client-7", "{rec}");
    assert_eq!(rec["status"], 400, "{rec}");
    assert_eq!(
        (&rec["upstream_request_id"], &rec["response_id"]),
        (
            &serde_json::json!(format!("req_mock_{port}_2")),
            &serde_json::Value::Null
        ),
        "{rec}"
    );
    // Gemini names no request, only its answer (`responseId`).
    let rec = record_by_request_id(&records, "client-8");
    assert_eq!(
        (&rec["upstream_request_id"], &rec["response_id"]),
        (
            &serde_json::Value::Null,
            &serde_json::json!(format!("mock_{port}_3"))
        ),
        "{rec}"
    );
    let records = relay.wait_records(6).await;
    for id in &echoed {
        let rec = record_by_id(&records, id);
        assert_eq!(rec["status"], 200, "{rec}");
        assert_eq!(rec["upstream_request_id"], serde_json::Value::Null, "{rec}");
    }
    // A Messages answer: Anthropic's `request-id` and the message's id.
    relay
        .create_account("claude-a", "claude", &mock.url(), "sk-ant-a")
        .await;
    relay.wait_accounts_loaded(3).await;
    send_message(&relay, &key, "ids-claude", "claude-sonnet-4-5", false).await;
    let records = relay.wait_records(7).await;
    let rec = record_by_request_id(&records, "ids-claude");
    assert_eq!(
        (&rec["upstream_request_id"], &rec["response_id"]),
        (
            &serde_json::json!(format!("req_mock_{port}_7")),
            &serde_json::json!("msg_mock_1")
        ),
        "{rec}"
    );
}

// ---------------------------------------------------------------------------------------------
// Model maps and cut streams, per protocol
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn model_map_renames_the_chat_body_model_and_the_gemini_path_model() {
    let mock = MockUpstream::start().await;
    let (relay, _, _, key) = relay_with_key(serde_json::json!({})).await;
    relay
        .create_account_with(serde_json::json!({
            "name": "openai-a", "type": "openai", "base_url": format!("{}/v1", mock.url()),
            "credential": OPENAI_SECRET, "model_map": {"gpt-4.1": "gpt-4.1-2025-04-14"},
        }))
        .await;
    relay
        .create_account_with(serde_json::json!({
            "name": "gemini-a", "type": "gemini", "base_url": mock.url(),
            "credential": GEMINI_SECRET,
            "model_map": {"gemini-2.5-flash": "gemini-2.5-flash-preview-09-2025"},
        }))
        .await;
    relay.wait_accounts_loaded(2).await;

    // A Chat stream: the model is renamed and usage is asked for, every other field kept.
    let mut body = chat_body("gpt-4.1", true, chat_conversation("map", 1));
    body["temperature"] = 0.5.into();
    let r = relay
        .post_bare("/v1/chat/completions")
        .bearer_auth(&key)
        .header("x-request-id", "map-chat")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert_eq!(sse_data(&text).last().map(String::as_str), Some("[DONE]"));
    let up = mock.requests()[0].json();
    assert_eq!(up["model"], "gpt-4.1-2025-04-14", "{up}");
    assert_eq!(up["stream_options"]["include_usage"], true, "{up}");
    assert_eq!(up["messages"], body["messages"], "{up}");
    assert_eq!(up["temperature"], 0.5, "{up}");

    // Gemini: the model is in the path.
    let r = relay
        .post_bare("/v1beta/models/gemini-2.5-flash:generateContent")
        .header("x-goog-api-key", &key)
        .header("x-request-id", "map-gemini")
        .json(&gemini_body("map", 1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await.unwrap();
    let up = &mock.requests()[1];
    assert_eq!(
        up.path,
        "/v1beta/models/gemini-2.5-flash-preview-09-2025:generateContent"
    );
    assert_eq!(up.json(), gemini_body("map", 1));

    let records = relay.wait_records(2).await;
    let rec = record_by_request_id(&records, "map-chat");
    assert_eq!(rec["requested_model"], "gpt-4.1", "{rec}");
    assert_eq!(rec["upstream_model"], "gpt-4.1-2025-04-14", "{rec}");
    let rec = record_by_request_id(&records, "map-gemini");
    assert_eq!(rec["requested_model"], "gemini-2.5-flash", "{rec}");
    assert_eq!(
        rec["upstream_model"], "gemini-2.5-flash-preview-09-2025",
        "{rec}"
    );
}

#[tokio::test]
async fn cut_streams_end_with_the_protocols_error_event_and_book_what_was_seen() {
    let mock = MockUpstream::start().await;
    let (relay, _, _, key) = relay_with_key(serde_json::json!({})).await;
    openai_account(&relay, &mock).await;
    gemini_account(&relay, &mock).await;
    relay.wait_accounts_loaded(2).await;
    mock.set(|b| {
        b.usage = GEMINI_USAGE;
        b.extra_usage = GEMINI_EXTRA;
        b.deltas = 6;
        b.cut_after = Some(3);
    });

    // Chat: `data: {"error": ...}` and no `[DONE]`.
    let r = relay
        .post_bare("/v1/chat/completions")
        .bearer_auth(&key)
        .header("x-request-id", "cut-chat")
        .json(&chat_body("gpt-4.1", true, chat_conversation("cut", 1)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let data = sse_data(&text);
    assert!(!data.iter().any(|d| d == "[DONE]"), "{text}");
    let last: serde_json::Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["type"], "upstream_error", "{text}");

    // Responses: `event: error`, no `response.completed`.
    let r = relay
        .post_bare("/v1/responses")
        .bearer_auth(&key)
        .header("x-request-id", "cut-responses")
        .json(&serde_json::json!({"model": "gpt-5", "input": "cut", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let events = sse_events(&text);
    assert_eq!(events.last().map(String::as_str), Some("error"), "{text}");
    assert!(!events.iter().any(|e| e == "response.completed"), "{text}");

    // Gemini: `data: {"error": ...}` after three chunks whose cumulative usage is booked.
    let r = relay
        .post_bare("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse")
        .header("x-goog-api-key", &key)
        .header("x-request-id", "cut-gemini")
        .json(&gemini_body("cut", 1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let data = sse_data(&text);
    assert_eq!(data.len(), 4, "three chunks and the error: {text}");
    let last: serde_json::Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["status"], "UNAVAILABLE", "{text}");

    // Gemini without `alt=sse` (a JSON array): three elements, then the connection closes.
    let r = relay
        .post_bare("/v1beta/models/gemini-2.5-flash:streamGenerateContent")
        .header("x-goog-api-key", &key)
        .header("x-request-id", "cut-gemini-array")
        .json(&gemini_body("cut", 1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await;

    let records = relay.wait_records(4).await;
    for id in ["cut-chat", "cut-responses", "cut-gemini"] {
        let rec = record_by_request_id(&records, id);
        assert_eq!(rec["error_type"], "upstream_error", "{rec}");
        assert_eq!(rec["estimated"], true, "counts seen until the cut: {rec}");
    }
    // OpenAI reports usage only at the end: the cut answers book the request's estimated input
    // (and the text seen), not nothing.
    for id in ["cut-chat", "cut-responses"] {
        let rec = record_by_request_id(&records, id);
        assert!(rec["input_tokens"].as_u64().unwrap() > 0, "{rec}");
        assert!(rec["billed_cost"].as_i64().unwrap() > 0, "{rec}");
    }
    let rec = record_by_request_id(&records, "cut-chat");
    assert!(
        rec["output_tokens"].as_u64().unwrap() > 0,
        "two deltas were seen: {rec}"
    );
    // The third Gemini chunk reported 211 × 3 / 6 = 105 candidate tokens so far.
    let rec = record_by_request_id(&records, "cut-gemini");
    assert_eq!(rec["input_tokens"], 2384, "{rec}");
    assert_eq!(rec["output_tokens"], 105 + 734, "{rec}");
    // The array's three elements are booked as the same three events are.
    let rec = record_by_request_id(&records, "cut-gemini-array");
    assert_eq!(rec["estimated"], true, "{rec}");
    assert_eq!(rec["input_tokens"], 2384, "{rec}");
    assert_eq!(rec["output_tokens"], 105 + 734, "{rec}");
}

/// Answers that end with clean framing but not as a whole answer does are booked as such: an
/// error event inside a successful stream names the record's error and flags its counts, a
/// stream closed before its terminal event is flagged, and a stream sent under another content
/// type is still metered.
#[tokio::test]
async fn in_band_errors_and_unfinished_streams_are_flagged() {
    let mock = MockUpstream::start().await;
    let (relay, _, _, key) = relay_with_key(serde_json::json!({})).await;
    relay
        .create_account(
            "claude-a",
            "claude",
            &mock.url(),
            "sk-ant-upstream-secret-0123",
        )
        .await;
    openai_account(&relay, &mock).await;
    relay.wait_accounts_loaded(2).await;

    // Anthropic: message_start, then an overloaded error event, then the last chunk.
    mock.set(|b| {
        b.end_after = Some(1);
        b.in_band_error = Some(
            "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n"
                .into(),
        );
    });
    let r = relay
        .post("/v1/messages", &key)
        .header("x-request-id", "in-band-anthropic")
        .json(&messages_body(
            "claude-sonnet-4-5",
            true,
            conversation("in-band", 1),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains("overloaded_error"), "{text}");

    // Responses: created and a delta, then the last chunk without response.completed.
    mock.set(|b| {
        b.end_after = Some(2);
        b.in_band_error = None;
    });
    let r = relay
        .post_bare("/v1/responses")
        .bearer_auth(&key)
        .header("x-request-id", "unfinished-responses")
        .json(&serde_json::json!({"model": "gpt-5", "input": "unfinished", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(
        !sse_events(&text).iter().any(|e| e == "response.completed"),
        "{text}"
    );

    // Chat: a whole stream, sent as text/plain.
    mock.set(|b| {
        b.end_after = None;
        b.stream_content_type = Some("text/plain; charset=utf-8".into());
    });
    let r = relay
        .post_bare("/v1/chat/completions")
        .bearer_auth(&key)
        .header("x-request-id", "plain-chat")
        .json(&chat_body("gpt-4.1", true, chat_conversation("plain", 1)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(sse_data(&text).iter().any(|d| d == "[DONE]"), "{text}");

    let records = relay.wait_records(3).await;
    let rec = record_by_request_id(&records, "in-band-anthropic");
    assert_eq!(rec["status"], 200, "{rec}");
    assert_eq!(rec["error_type"], "overloaded_error", "{rec}");
    assert_eq!(rec["estimated"], true, "{rec}");
    assert_eq!(
        rec["input_tokens"], 12,
        "message_start's usage is booked: {rec}"
    );

    let rec = record_by_request_id(&records, "unfinished-responses");
    assert_eq!(rec["estimated"], true, "{rec}");
    assert!(rec["error_type"].is_null(), "{rec}");

    let rec = record_by_request_id(&records, "plain-chat");
    assert_eq!(rec["estimated"], false, "{rec}");
    assert!(rec["error_type"].is_null(), "{rec}");
    assert!(
        rec["input_tokens"].as_u64().unwrap() > 0 && rec["output_tokens"].as_u64().unwrap() > 0,
        "the stream's usage chunk was metered: {rec}"
    );

    let metrics = relay.metrics_text().await;
    assert!(
        metrics.contains("relay_estimated_requests_total{protocol=\"anthropic\"} 1"),
        "{metrics}"
    );
}
