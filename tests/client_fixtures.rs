//! Every captured real-client request in `tests/fixtures/client-requests/`, sent to a real relay
//! as the client sent it (method, path, query, headers and body; only the credential swapped
//! for a relay key, in the client's own header), against mock accounts of every type: the
//! client can read the answer, the upstream gets the same request on its own path with the
//! account's credential, both turns of a conversation reach one account, and each request is
//! booked.

mod common;

use std::collections::HashMap;

use common::mock_upstream::{MockUpstream, Received};
use common::{assert_no_relay_key, record_by_id, ClientFixture, Relay};

/// Usage every mock reports (`MockUsage` default): the same normalised counts on every
/// protocol, as nothing is cached and nothing is reasoning.
const INPUT_TOKENS: u64 = 12;
const OUTPUT_TOKENS: u64 = 34;

/// The protocol a client path speaks (DESIGN §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Anthropic,
    Chat,
    Responses,
    Gemini,
}

impl Protocol {
    fn of(path: &str) -> Protocol {
        if path.ends_with("/messages") {
            Protocol::Anthropic
        } else if path.ends_with("/chat/completions") {
            Protocol::Chat
        } else if path.ends_with("/responses") {
            Protocol::Responses
        } else if path.contains("/models/") {
            Protocol::Gemini
        } else {
            panic!("no protocol for captured path {path}")
        }
    }

    /// Account types that serve it (DESIGN §4).
    fn account_types(self) -> &'static [&'static str] {
        match self {
            Protocol::Anthropic => &["claude"],
            Protocol::Chat => &["openai"],
            Protocol::Responses => &["openai-responses", "openai"],
            Protocol::Gemini => &["gemini"],
        }
    }

    /// The path the route appends to an account's base URL.
    fn upstream_path(self, client_path: &str) -> String {
        match self {
            Protocol::Anthropic => "/v1/messages".into(),
            Protocol::Chat => "/chat/completions".into(),
            Protocol::Responses => "/responses".into(),
            Protocol::Gemini => client_path
                .strip_prefix("/gemini")
                .unwrap_or(client_path)
                .replacen("/v1/models/", "/v1beta/models/", 1),
        }
    }

    /// Its name in usage records.
    fn record_name(self) -> &'static str {
        match self {
            Protocol::Anthropic => "anthropic",
            Protocol::Chat => "openai_chat",
            Protocol::Responses => "openai_responses",
            Protocol::Gemini => "gemini",
        }
    }
}

/// One account of the test relay and the mock upstream behind it.
struct Account {
    name: String,
    kind: &'static str,
    /// The base URL's path, before the route's upstream path.
    prefix: &'static str,
    secret: String,
    id: String,
    mock: MockUpstream,
}

impl Account {
    /// The header and value that carry this account's credential upstream (DESIGN §4).
    fn credential(&self) -> (&'static str, String) {
        match self.kind {
            "claude" => ("x-api-key", self.secret.clone()),
            "gemini" => ("x-goog-api-key", self.secret.clone()),
            _ => ("authorization", format!("Bearer {}", self.secret)),
        }
    }
}

/// Two accounts of each type, each on its own mock, set up as operators set them for these
/// clients: `openai` with OpenAI's `/v1` base path for the openai SDK's `gpt-5`, and
/// `openai-responses` under ChatGPT's Codex path for Codex's `gpt-5.5`. Both types serve
/// Responses in one pool (DESIGN §4); their model lists send each client to its own type.
async fn accounts(relay: &Relay) -> Vec<Account> {
    let mut out = Vec::new();
    for (kind, prefix, models) in [
        ("claude", "", serde_json::json!([])),
        ("openai", "/v1", serde_json::json!(["gpt-5"])),
        (
            "openai-responses",
            "/backend-api/codex",
            serde_json::json!(["gpt-5.5"]),
        ),
        ("gemini", "", serde_json::json!([])),
    ] {
        for n in ["a", "b"] {
            let mock = MockUpstream::start().await;
            let name = format!("{kind}-{n}");
            let secret = format!("upstream-secret-{name}");
            let id = relay
                .create_account_with(serde_json::json!({
                    "name": name,
                    "type": kind,
                    "base_url": format!("{}{prefix}", mock.url()),
                    "credential": secret,
                    "models": models,
                }))
                .await;
            out.push(Account {
                name,
                kind,
                prefix,
                secret,
                id,
                mock,
            });
        }
    }
    relay.wait_accounts_loaded(out.len() as i64).await;
    out
}

/// One SSE event: its `event:` name, if any, and its `data:` lines joined.
struct SseEvent {
    name: Option<String>,
    data: String,
}

/// The events of an SSE body (`\n` or `\r\n` line endings).
fn sse(text: &str) -> Vec<SseEvent> {
    text.replace("\r\n", "\n")
        .split("\n\n")
        .filter_map(|block| {
            let mut name = None;
            let mut data = Vec::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push(v.trim());
                }
            }
            (name.is_some() || !data.is_empty()).then(|| SseEvent {
                name,
                data: data.join("\n"),
            })
        })
        .collect()
}

/// The model the capture asks for: the body's `model`, or the Gemini path's.
fn requested_model(fx: &ClientFixture) -> String {
    match fx.body["model"].as_str() {
        Some(m) => m.to_string(),
        None => fx
            .path
            .rsplit_once("/models/")
            .and_then(|(_, rest)| rest.split_once(':'))
            .map(|(m, _)| m.to_string())
            .unwrap_or_else(|| panic!("{}: no model in body or path", fx.name)),
    }
}

/// The answer is one the client reads: an SSE stream ending as the protocol ends it when the
/// client asked for a stream, else the protocol's JSON object.
fn assert_client_reads(fx: &ClientFixture, protocol: Protocol, content_type: &str, text: &str) {
    let name = &fx.name;
    if !fx.stream {
        assert!(
            content_type.starts_with("application/json"),
            "{name}: {content_type}"
        );
        let v: serde_json::Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("{name}: answer is no JSON ({e}): {text}"));
        match protocol {
            Protocol::Anthropic => assert_eq!(v["type"], "message", "{name}: {v}"),
            Protocol::Chat => assert_eq!(v["object"], "chat.completion", "{name}: {v}"),
            Protocol::Responses => assert_eq!(v["status"], "completed", "{name}: {v}"),
            Protocol::Gemini => {
                assert_eq!(v["candidates"][0]["finishReason"], "STOP", "{name}: {v}")
            }
        }
        return;
    }
    assert!(
        content_type.starts_with("text/event-stream"),
        "{name}: {content_type}"
    );
    let events = sse(text);
    assert!(events.len() > 1, "{name}: {text}");
    let (first, last) = (&events[0], &events[events.len() - 1]);
    // Every data payload but Chat's `[DONE]` is a JSON object.
    for e in &events {
        if e.data != "[DONE]" {
            let v: serde_json::Value = serde_json::from_str(&e.data)
                .unwrap_or_else(|err| panic!("{name}: event data is no JSON ({err}): {text}"));
            assert!(v.is_object(), "{name}: {text}");
        }
    }
    match protocol {
        Protocol::Anthropic => {
            assert_eq!(
                first.name.as_deref(),
                Some("message_start"),
                "{name}: {text}"
            );
            assert_eq!(last.name.as_deref(), Some("message_stop"), "{name}: {text}");
        }
        Protocol::Responses => {
            assert_eq!(
                first.name.as_deref(),
                Some("response.created"),
                "{name}: {text}"
            );
            assert_eq!(
                last.name.as_deref(),
                Some("response.completed"),
                "{name}: {text}"
            );
        }
        Protocol::Chat => {
            assert_eq!(last.data, "[DONE]", "{name}: {text}");
            // A client that asked for usage gets the usage chunk.
            if fx.body["stream_options"]["include_usage"] == true {
                let usage = &events[events.len() - 2].data;
                let v: serde_json::Value = serde_json::from_str(usage).unwrap_or_default();
                assert_eq!(v["usage"]["prompt_tokens"], INPUT_TOKENS, "{name}: {text}");
            }
        }
        Protocol::Gemini => {
            let v: serde_json::Value = serde_json::from_str(&last.data).unwrap_or_default();
            assert_eq!(v["candidates"][0]["finishReason"], "STOP", "{name}: {text}");
        }
    }
}

/// Captured headers that do not reach the upstream as captured: transport headers of the
/// captured connection (reqwest sets its own), hop-by-hop `connection`, and `accept-encoding`,
/// which the relay sets to `identity` (DESIGN §8). The credential header comes on top.
const NOT_FORWARDED_AS_IS: &[&str] = &["host", "content-length", "connection", "accept-encoding"];

/// Client credential headers, never forwarded (DESIGN §8).
const CREDENTIAL_HEADERS: &[&str] = &["authorization", "x-api-key", "x-goog-api-key"];

/// The upstream got the capture on the account's path, with its query (without `key=`), the
/// account's credential, every other captured header unchanged and the body as sent (Chat
/// streams that did not ask for usage gain `stream_options.include_usage`).
fn assert_upstream_got(
    fx: &ClientFixture,
    protocol: Protocol,
    account: &Account,
    up: &Received,
    key: &str,
    request_id: &str,
) {
    let name = &fx.name;
    assert!(
        protocol.account_types().contains(&account.kind),
        "{name}: served by {} ({})",
        account.name,
        account.kind
    );
    assert_eq!(up.method, fx.method, "{name}");
    let query: Vec<String> = fx
        .query
        .iter()
        .filter(|(k, _)| k != "key")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let mut expected_path = format!("{}{}", account.prefix, protocol.upstream_path(&fx.path));
    if !query.is_empty() {
        expected_path = format!("{expected_path}?{}", query.join("&"));
    }
    assert_eq!(up.path, expected_path, "{name} on {}", account.name);

    let (cred_header, cred_value) = account.credential();
    assert_eq!(
        up.header(cred_header),
        Some(cred_value.as_str()),
        "{name} on {}",
        account.name
    );
    for h in CREDENTIAL_HEADERS.iter().filter(|h| **h != cred_header) {
        assert_eq!(up.header(h), None, "{name}: client credential header {h}");
    }
    assert_no_relay_key(up, key);

    let credential = fx.credential_header();
    for (h, v) in &fx.headers {
        if h == credential || NOT_FORWARDED_AS_IS.contains(&h.as_str()) {
            continue;
        }
        assert_eq!(
            up.header(h),
            Some(v.as_str()),
            "{name}: header {h} changed on its way upstream"
        );
    }
    assert_eq!(up.header("accept-encoding"), Some("identity"), "{name}");
    assert_eq!(up.header("x-request-id"), Some(request_id), "{name}");

    let sent = fx.body_bytes();
    if protocol == Protocol::Chat && fx.stream && fx.body["stream_options"]["include_usage"] != true
    {
        let mut expected = fx.body.clone();
        expected["stream_options"]["include_usage"] = true.into();
        assert_eq!(up.json(), expected, "{name}: Chat stream body upstream");
    } else {
        assert!(
            up.body == sent,
            "{name}: body changed upstream:\nsent {}\ngot  {}",
            String::from_utf8_lossy(&sent),
            String::from_utf8_lossy(&up.body)
        );
    }
}

#[tokio::test]
async fn every_client_capture_is_relayed_as_sent_sticks_and_is_booked() {
    let relay = Relay::start().await;
    let user_id = relay.create_user("alice", 10_000).await;
    let (key_id, key) = relay.create_key(&user_id, serde_json::json!({})).await;
    relay.wait_key_active(&key).await;
    let accounts = accounts(&relay).await;

    let fixtures = ClientFixture::load_all();
    assert_eq!(
        fixtures.len(),
        14,
        "captures in tests/fixtures/client-requests"
    );
    // Conversation → the account its first turn reached.
    let mut bound: HashMap<String, &str> = HashMap::new();
    // (capture, request id, account) of every request sent.
    let mut sent = Vec::new();
    for fx in &fixtures {
        let name = &fx.name;
        let protocol = Protocol::of(&fx.path);
        let before: Vec<usize> = accounts.iter().map(|a| a.mock.count()).collect();

        let r = fx
            .request_as_captured(&relay, &key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{name}: relay unreachable: {e}"));
        let status = r.status();
        let header = |h: &str| {
            r.headers()
                .get(h)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        let content_type = header("content-type");
        let (answered_id, relay_id) = (header("x-request-id"), header("x-relay-request-id"));
        let text = r.text().await.unwrap();
        assert!(status.is_success(), "{name}: {status} {text}");
        assert!(!relay_id.is_empty(), "{name}: no x-relay-request-id");
        assert_client_reads(fx, protocol, &content_type, &text);

        // Exactly one account got exactly this one request.
        let reached: Vec<(&Account, usize)> = accounts
            .iter()
            .zip(&before)
            .filter(|(a, n)| a.mock.count() != **n)
            .map(|(a, n)| (a, a.mock.count() - n))
            .collect();
        let [(account, 1)] = reached[..] else {
            panic!(
                "{name}: reached {:?}",
                reached
                    .iter()
                    .map(|(a, n)| format!("{} ×{n}", a.name))
                    .collect::<Vec<_>>()
            );
        };
        let up = account.mock.requests().pop().unwrap();
        assert_upstream_got(fx, protocol, account, &up, &key, &relay_id);
        // The answer's x-request-id is the upstream's own where it sent one (OpenAI), else the
        // relay's: the client's SDK reports the id the provider knows.
        let expected_id = match protocol {
            Protocol::Chat | Protocol::Responses => {
                format!("req_mock_{}_{}", account.mock.port, account.mock.count())
            }
            Protocol::Anthropic | Protocol::Gemini => relay_id.clone(),
        };
        assert_eq!(answered_id, expected_id, "{name}");

        // Turn 2 follows turn 1 (the client's own session identity, DESIGN §7).
        let first = *bound
            .entry(fx.conversation().to_string())
            .or_insert(account.name.as_str());
        assert_eq!(
            first,
            account.name,
            "{name}: conversation {} moved from {first} to {}",
            fx.conversation(),
            account.name
        );
        sent.push((fx, relay_id, account));
    }
    assert_eq!(bound.len(), 7, "conversations: {:?}", bound.keys());
    // Every account type served some client (Codex on `openai-responses`, the SDKs on `openai`).
    for kind in ["claude", "openai", "openai-responses", "gemini"] {
        assert!(
            sent.iter().any(|(_, _, a)| a.kind == kind),
            "no capture reached a {kind} account"
        );
    }

    let records = relay.wait_records(sent.len()).await;
    for (fx, relay_id, account) in &sent {
        let name = &fx.name;
        let rec = record_by_id(&records, relay_id);
        assert_eq!(rec["status"], 200, "{name}: {rec}");
        assert_eq!(
            rec["protocol"],
            Protocol::of(&fx.path).record_name(),
            "{name}: {rec}"
        );
        assert_eq!(rec["stream"], fx.stream, "{name}: {rec}");
        assert_eq!(rec["account_id"], account.id.as_str(), "{name}: {rec}");
        assert_eq!(rec["api_key_id"], key_id.as_str(), "{name}: {rec}");
        assert_eq!(rec["requested_model"], requested_model(fx), "{name}: {rec}");
        assert_eq!(rec["input_tokens"], INPUT_TOKENS, "{name}: {rec}");
        assert_eq!(rec["output_tokens"], OUTPUT_TOKENS, "{name}: {rec}");
    }
}
