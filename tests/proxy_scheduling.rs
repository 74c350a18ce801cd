//! Scheduling and failover end to end: failover of a 5 MiB body, connect errors and header
//! timeouts before the first byte, strategies and session modes from config, the per-account
//! concurrency cap, and the metrics that count all of it.

mod common;

use std::time::Duration;

use common::mock_upstream::{Behavior, MockUpstream};
use common::{conversation, messages_body, Relay, RelayOptions};

const MODEL: &str = "claude-sonnet-4-5";

async fn relay_with(env: &[(&str, &str)]) -> Relay {
    Relay::start_with(RelayOptions {
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    })
    .await
}

async fn key_for(relay: &Relay, accounts: i64) -> String {
    let user = relay.create_user("sched", 10_000).await;
    let (_, key) = relay.create_key(&user, serde_json::json!({})).await;
    relay.wait_key_active(&key).await;
    relay.wait_accounts_loaded(accounts).await;
    key
}

fn rate_limited(mock: &MockUpstream) {
    mock.set(|b| {
        b.status = 429;
        b.error_body =
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#.into();
        b.extra_headers = vec![
            (
                "anthropic-ratelimit-unified-status".into(),
                "rejected".into(),
            ),
            // An hour from now, in epoch seconds.
            (
                "anthropic-ratelimit-unified-reset".into(),
                (now_ms() / 1000 + 3600).to_string(),
            ),
        ];
    });
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_millis() as i64
}

/// Makes `mock` answer 429 with `retry-after: {retry_after}`, as an OpenAI-compatible third
/// party may.
fn rate_limited_for(mock: &MockUpstream, retry_after: &str) {
    let retry_after = retry_after.to_string();
    mock.set(|b| {
        b.status = 429;
        b.error_body =
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#.into();
        b.extra_headers = vec![("retry-after".into(), retry_after)];
    });
}

#[tokio::test]
async fn a_5_mib_request_fails_over_byte_identical() {
    let relay = Relay::start().await;
    // The 429-ing account is preferred: every request tries it first.
    let (bad, good, _, key) = preferred_and_good(&relay, "claude").await;
    rate_limited(&bad);
    let filler: String = (0u64..5 * 1024 * 1024 / 16)
        .map(|i| format!("{:015x}.", i * 31))
        .collect();
    let body = serde_json::to_vec(&messages_body(
        MODEL,
        true,
        serde_json::json!([{"role": "user", "content": filler}]),
    ))
    .unwrap();
    let r = relay
        .post("/v1/messages", &key)
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = String::from_utf8(r.bytes().await.unwrap().to_vec()).unwrap();
    assert!(text.contains("message_stop"));
    assert_eq!(bad.count(), 1);
    assert!(
        bad.requests()[0].body == body,
        "first attempt got a different body"
    );
    assert_eq!(good.count(), 1);
    assert!(good.requests()[0].body == body, "failover body differs");
    assert_eq!(good.requests()[0].header("x-api-key"), Some("sk-good"));
    // The account is cooling until the reset the provider announced: no second try.
    let r = relay
        .post("/v1/messages", &key)
        .json(&messages_body(MODEL, false, conversation("again", 1)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(bad.count(), 1, "a cooling account was tried again");
    let records = relay.wait_records(2).await;
    assert!(
        records.iter().any(|r| r["failover_count"] == 1),
        "no record counts the failover"
    );

    // The account states are published by the refresh loop, a refresh after the cooldown.
    relay
        .wait_metric("relay_account_state{platform=\"claude\",state=\"cooling\"} 1")
        .await;
    let metrics = relay.metrics_text().await;
    for needle in [
        "relay_failovers_total{reason=\"rate_limited\"} 1",
        "relay_account_cooldowns_total{reason=\"rate_limited\"} 1",
        "relay_sticky_total{result=\"miss\"}",
        "relay_requests_total{",
        "relay_tokens_total{",
    ] {
        assert!(metrics.contains(needle), "metrics lack {needle}");
    }
    assert!(!metrics.contains(&key), "a key leaked into the metrics");
}

#[tokio::test]
async fn connect_errors_and_header_timeouts_fail_over() {
    let slow = MockUpstream::start().await;
    let good = MockUpstream::start().await;
    slow.set(|b| b.head_delay = Duration::from_secs(3));
    let relay = relay_with(&[
        ("RELAY_UPSTREAM__HEADER_TIMEOUT", "1s"),
        ("RELAY_UPSTREAM__MAX_ATTEMPTS", "3"),
    ])
    .await;
    // The discard port, which nothing serves on loopback.
    let closed = "http://127.0.0.1:9";
    relay
        .create_account_with(serde_json::json!({"name": "closed", "type": "claude", "base_url": closed, "credential": "sk-1", "priority": 1}))
        .await;
    relay
        .create_account_with(serde_json::json!({"name": "slow", "type": "claude", "base_url": slow.url(), "credential": "sk-2", "priority": 2}))
        .await;
    relay
        .create_account_with(serde_json::json!({"name": "good", "type": "claude", "base_url": good.url(), "credential": "sk-3", "priority": 3}))
        .await;
    let key = key_for(&relay, 3).await;
    let r = relay
        .post("/v1/messages", &key)
        .json(&messages_body(MODEL, false, conversation("timeouts", 1)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(slow.count(), 1, "the slow account was not tried second");
    assert_eq!(good.count(), 1);
    let records = relay.wait_records(1).await;
    assert_eq!(records[0]["failover_count"], 2, "{}", records[0]);

    // With every attempt failing, the client gets a 502 in its protocol's shape.
    let relay = relay_with(&[("RELAY_UPSTREAM__MAX_ATTEMPTS", "2")]).await;
    relay
        .create_account("closed", "claude", "http://127.0.0.1:9", "sk-1")
        .await;
    let key = key_for(&relay, 1).await;
    let r = relay
        .post("/v1/messages", &key)
        .json(&messages_body(MODEL, false, conversation("down", 1)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "upstream_error");
}

#[tokio::test]
async fn strategies_and_session_modes_come_from_config() {
    // round_robin: new conversations alternate between the two accounts.
    let a = MockUpstream::start().await;
    let b = MockUpstream::start().await;
    let relay = relay_with(&[("RELAY_SCHEDULER__STRATEGY", "round_robin")]).await;
    relay.create_account("a", "claude", &a.url(), "sk-a").await;
    relay.create_account("b", "claude", &b.url(), "sk-b").await;
    let key = key_for(&relay, 2).await;
    for i in 0..6 {
        let r = relay
            .post("/v1/messages", &key)
            .json(&messages_body(
                MODEL,
                false,
                conversation(&format!("rr {i}"), 1),
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!((a.count(), b.count()), (3, 3));

    // api_key: every conversation of a key on one account.
    let a = MockUpstream::start().await;
    let b = MockUpstream::start().await;
    let relay = relay_with(&[("RELAY_SESSION__STRATEGY", "api_key")]).await;
    relay.create_account("a", "claude", &a.url(), "sk-a").await;
    relay.create_account("b", "claude", &b.url(), "sk-b").await;
    let key = key_for(&relay, 2).await;
    for i in 0..8 {
        let r = relay
            .post("/v1/messages", &key)
            .json(&messages_body(
                MODEL,
                false,
                conversation(&format!("k {i}"), 1),
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert!(
        a.count() == 8 || b.count() == 8,
        "api_key strategy split a key: {}/{}",
        a.count(),
        b.count()
    );
}

#[tokio::test]
async fn account_concurrency_cap_moves_requests_to_another_account() {
    let capped = MockUpstream::start().await;
    let other = MockUpstream::start().await;
    // Held long enough for all four requests to arrive while the first is in.
    capped.set(|b| b.head_delay = Duration::from_secs(2));
    other.set(|b| b.head_delay = Duration::from_secs(2));
    let relay = relay_with(&[("RELAY_SESSION__STRATEGY", "none")]).await;
    relay
        .create_account_with(serde_json::json!({"name": "capped", "type": "claude", "base_url": capped.url(), "credential": "sk-c", "priority": 1, "max_concurrency": 1}))
        .await;
    relay
        .create_account_with(serde_json::json!({"name": "other", "type": "claude", "base_url": other.url(), "credential": "sk-o", "priority": 2}))
        .await;
    let key = key_for(&relay, 2).await;
    let relay = std::sync::Arc::new(relay);
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let relay = relay.clone();
            let key = key.clone();
            tokio::spawn(async move {
                relay
                    .post("/v1/messages", &key)
                    .json(&messages_body(
                        MODEL,
                        false,
                        conversation(&format!("cap {i}"), 1),
                    ))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    // The preferred account took one request at a time: with 4 at once, it took exactly one.
    assert_eq!(capped.count(), 1);
    assert_eq!(other.count(), 3);
}

/// Two accounts on `relay`: "limited" (preferred, answering 429 with a retry-after of a
/// billion seconds, some 30 years) and "good"; their mocks, the limited one's id and a key.
async fn limited_and_good(relay: &Relay) -> (MockUpstream, MockUpstream, String, String) {
    let (limited, good, limited_id, key) = preferred_and_good(relay, "claude").await;
    rate_limited_for(&limited, "1000000000");
    (limited, good, limited_id, key)
}

/// Two accounts of `kind` on `relay`: a preferred one (priority 1, which every new
/// conversation tries first) and "good"; their mocks, the preferred one's id and a key.
async fn preferred_and_good(
    relay: &Relay,
    kind: &str,
) -> (MockUpstream, MockUpstream, String, String) {
    let preferred = MockUpstream::start().await;
    let good = MockUpstream::start().await;
    let credential = |who: &str| match kind {
        "gemini" => format!("AIza-{who}"),
        _ => format!("sk-{who}"),
    };
    let preferred_id = relay
        .create_account_with(serde_json::json!({"name": "preferred", "type": kind, "base_url": preferred.url(), "credential": credential("preferred"), "priority": 1}))
        .await;
    relay
        .create_account("good", kind, &good.url(), &credential("good"))
        .await;
    let key = key_for(relay, 2).await;
    (preferred, good, preferred_id, key)
}

#[tokio::test]
async fn a_huge_retry_after_cools_for_no_longer_than_the_cap() {
    let relay = relay_with(&[("RELAY_SCHEDULER__COOLDOWN_429_MAX", "2h")]).await;
    let (limited, good, limited_id, key) = limited_and_good(&relay).await;
    let before = now_ms();
    let r = relay
        .post("/v1/messages", &key)
        .json(&messages_body(MODEL, false, conversation("huge", 1)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "no failover");
    assert_eq!((limited.count(), good.count()), (1, 1));
    let until = relay.wait_stored_cooldown(&limited_id).await;
    let two_hours = 2 * 3600 * 1000;
    assert!(
        until >= before + two_hours && until <= now_ms() + two_hours,
        "cooling until {until}, not {two_hours} ms from {before}"
    );
    // Still cooling: the next conversation goes to the other account.
    let r = relay
        .post("/v1/messages", &key)
        .json(&messages_body(MODEL, false, conversation("next", 1)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!((limited.count(), good.count()), (1, 2));
}

#[tokio::test]
async fn setting_a_cooling_account_valid_puts_it_back_at_once() {
    let relay = Relay::start().await;
    let (limited, good, limited_id, key) = limited_and_good(&relay).await;
    let ask = |topic: &'static str| {
        relay
            .post("/v1/messages", &key)
            .json(&messages_body(MODEL, false, conversation(topic, 1)))
            .send()
    };
    assert_eq!(ask("one").await.unwrap().status(), 200, "no failover");
    assert_eq!((limited.count(), good.count()), (1, 1));
    // Stored: reloads of the account now bring the cooldown with them.
    relay.wait_stored_cooldown(&limited_id).await;
    assert_eq!(ask("two").await.unwrap().status(), 200);
    assert_eq!(
        (limited.count(), good.count()),
        (1, 2),
        "tried while cooling"
    );

    // The provider serves again and the operator says so.
    limited.set(|b| *b = Behavior::default());
    let (status, v) = relay
        .patch_account(&limited_id, serde_json::json!({"status": "valid"}))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["cooldown_until"], serde_json::Value::Null);
    assert!(v["cooldown_cleared_at"].is_i64(), "{v}");
    // The audit says a cooldown was ended, and which.
    let audit = relay.admin_get("/api/admin/audit?per_page=50").await;
    let update = audit["items"]
        .as_array()
        .expect("audit items")
        .iter()
        .find(|e| e["action"] == "account.update")
        .cloned()
        .expect("the update audited");
    assert!(update["detail"]["cooldown_ended"].is_i64(), "{update}");
    // The next request goes to it, and the ones after it too.
    assert_eq!(ask("three").await.unwrap().status(), 200);
    assert_eq!((limited.count(), good.count()), (2, 2), "still cooling");
    relay
        .wait_metric("relay_account_state{platform=\"claude\",state=\"available\"} 2")
        .await;
    // Counted per platform; one without accounts has none available.
    let metrics = relay.metrics_text().await;
    assert!(
        metrics.contains("relay_account_state{platform=\"gemini\",state=\"available\"} 0"),
        "{metrics}"
    );
    assert_eq!(ask("four").await.unwrap().status(), 200);
    assert_eq!((limited.count(), good.count()), (3, 2), "cooling again");
}

/// Makes `mock` answer every request with `status` and the error `body`.
fn answer(mock: &MockUpstream, status: u16, body: &str) {
    let body = body.to_string();
    mock.set(|b| {
        b.status = status;
        b.error_body = body;
        b.extra_headers = Vec::new();
    });
}

/// The account as the admin API shows it, once `done` holds (its state is stored shortly after
/// the answer that changed it).
async fn wait_account(
    relay: &Relay,
    id: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let a = relay.admin_get(&format!("/api/admin/accounts/{id}")).await;
        if done(&a) {
            return a;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {a}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An operator puts the account back in service (ending any cooldown).
async fn put_back(relay: &Relay, id: &str) {
    let (status, v) = relay
        .admin_patch(
            &format!("/api/admin/accounts/{id}"),
            serde_json::json!({"status": "valid"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
}

const ORG_DISABLED: &str = r#"{"type":"error","error":{"type":"invalid_request_error","message":"This organization has been disabled."}}"#;
const NO_CREDIT: &str = r#"{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."}}"#;
const CLIENT_ERROR: &str = r#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: Field required"}}"#;

#[tokio::test]
async fn an_account_refused_with_a_400_is_marked_and_the_request_fails_over() {
    let relay = Relay::start().await;
    let (dead, good, dead_id, key) = preferred_and_good(&relay, "claude").await;
    let ask = |topic: &str| {
        relay
            .post("/v1/messages", &key)
            .json(&messages_body(MODEL, false, conversation(topic, 1)))
            .send()
    };

    // A disabled organization: blocked, and the request served by the other account.
    answer(&dead, 400, ORG_DISABLED);
    let r = ask("disabled").await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    assert_eq!((dead.count(), good.count()), (1, 1));
    wait_account(&relay, &dead_id, "blocked", |a| a["status"] == "blocked").await;
    assert_eq!(ask("after disabled").await.unwrap().status(), 200);
    assert_eq!(dead.count(), 1, "a blocked account was asked again");

    // No credit left: cooling (for long), the request served elsewhere.
    put_back(&relay, &dead_id).await;
    answer(&dead, 400, NO_CREDIT);
    assert_eq!(ask("no credit").await.unwrap().status(), 200);
    assert_eq!((dead.count(), good.count()), (2, 3));
    assert_eq!(ask("after no credit").await.unwrap().status(), 200);
    assert_eq!(dead.count(), 2, "an account without credit was asked again");
    relay
        .wait_metric("relay_account_cooldowns_total{reason=\"no_credit\"} 1")
        .await;
    // The cooldown is stored after the answer: put back only once it is, or the store's
    // write lands after the operator's and the account cools again.
    wait_account(&relay, &dead_id, "no-credit cooldown stored", |a| {
        !a["cooldown_until"].is_null()
    })
    .await;

    // The client's own mistake: passed on as it came, no failover, the account none the worse.
    put_back(&relay, &dead_id).await;
    answer(&dead, 400, CLIENT_ERROR);
    for n in 1..=6 {
        let r = ask(&format!("client error {n}")).await.unwrap();
        assert_eq!(r.status(), 400);
        assert_eq!(r.text().await.unwrap(), CLIENT_ERROR);
    }
    assert_eq!((dead.count(), good.count()), (8, 4));
    let a = relay
        .admin_get(&format!("/api/admin/accounts/{dead_id}"))
        .await;
    assert_eq!(
        (a["status"].clone(), a["consecutive_error_count"].clone()),
        (serde_json::json!("valid"), serde_json::json!(0)),
        "{a}"
    );
}

const GEMINI_PATH: &str = "/v1beta/models/gemini-2.5-flash:generateContent";

#[tokio::test]
async fn a_gemini_key_called_invalid_is_taken_out_and_a_403_about_a_file_is_the_clients() {
    let relay = Relay::start().await;
    let (bad, good, bad_id, key) = preferred_and_good(&relay, "gemini").await;
    let ask = |topic: &str| {
        relay
            .post(GEMINI_PATH, &key)
            .json(&common::gemini_body(topic, 1))
            .send()
    };

    answer(
        &bad,
        400,
        r#"{"error":{"code":400,"message":"API key expired. Please renew the API key.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com","metadata":{"service":"generativelanguage.googleapis.com"}}]}}"#,
    );
    let r = ask("expired").await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    assert_eq!((bad.count(), good.count()), (1, 1));
    wait_account(&relay, &bad_id, "out for errors", |a| {
        a["status"] == "error"
    })
    .await;

    // A file the tenant names and may not use: its 403 is passed on as it came, never counted
    // against the account nor failed over, however often and whatever the name says.
    put_back(&relay, &bad_id).await;
    let file_denied = r#"{"error":{"code":403,"message":"You do not have permission to access the File deactivated or it may not exist.","status":"PERMISSION_DENIED"}}"#;
    answer(&bad, 403, file_denied);
    for n in 1..=6 {
        let r = ask(&format!("file {n}")).await.unwrap();
        assert_eq!(r.status(), 403);
        assert_eq!(r.text().await.unwrap(), file_denied);
    }
    assert_eq!((bad.count(), good.count()), (7, 1), "failed over");
    let a = relay
        .admin_get(&format!("/api/admin/accounts/{bad_id}"))
        .await;
    assert_eq!(
        (a["status"].clone(), a["consecutive_error_count"].clone()),
        (serde_json::json!("valid"), serde_json::json!(0)),
        "{a}"
    );
}

#[tokio::test]
async fn an_account_refused_on_the_last_attempt_is_an_upstream_error_to_the_client() {
    let openai = MockUpstream::start().await;
    let claude = MockUpstream::start().await;
    let relay = relay_with(&[("RELAY_UPSTREAM__MAX_ATTEMPTS", "2")]).await;
    let openai_id = relay
        .create_account("openai", "openai", &openai.url(), "sk-openai")
        .await;
    relay
        .create_account("claude", "claude", &claude.url(), "sk-claude")
        .await;
    let key = key_for(&relay, 2).await;

    // OpenAI's deactivated account: blocked at once, by its code alone.
    answer(
        &openai,
        401,
        r#"{"error":{"message":"This key is associated with a deactivated account. If you feel this is an error, contact us through our help center at help.openai.com.","type":"invalid_request_error","param":null,"code":"account_deactivated"}}"#,
    );
    let r = relay
        .post_json(
            "/v1/chat/completions",
            &key,
            &common::chat_body("gpt-4o", false, common::chat_conversation("gone", 1)),
        )
        .await;
    // Not the client's key that failed: no 401 (which clients take for their own key).
    assert_eq!(r.status(), 502);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "upstream_error", "{v}");
    assert_eq!(v["error"]["code"], "upstream_error", "{v}");
    wait_account(&relay, &openai_id, "blocked", |a| a["status"] == "blocked").await;

    // A refused credential, in the Anthropic shape.
    answer(
        &claude,
        401,
        r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#,
    );
    let r = relay
        .post_json(
            "/v1/messages",
            &key,
            &messages_body(MODEL, false, conversation("refused", 1)),
        )
        .await;
    assert_eq!(r.status(), 502);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        (v["type"].clone(), v["error"]["type"].clone()),
        (
            serde_json::json!("error"),
            serde_json::json!("upstream_error")
        ),
        "{v}"
    );
}

#[tokio::test]
async fn a_used_up_quota_cools_for_long_not_as_a_rate_limit() {
    let relay = Relay::start().await;
    let (spent, good, _, key) = preferred_and_good(&relay, "openai").await;
    answer(
        &spent,
        429,
        r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#,
    );
    let r = relay
        .post_json(
            "/v1/chat/completions",
            &key,
            &common::chat_body("gpt-4o", false, common::chat_conversation("quota", 1)),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!((spent.count(), good.count()), (1, 1));
    relay
        .wait_metric("relay_account_cooldowns_total{reason=\"no_credit\"} 1")
        .await;
    let metrics = relay.metrics_text().await;
    assert!(
        !metrics.contains("relay_account_cooldowns_total{reason=\"rate_limited\"}"),
        "counted as a rate limit"
    );
    assert!(metrics.contains("relay_failovers_total{reason=\"no_credit\"} 1"));
}

#[tokio::test]
async fn an_empty_pool_says_when_to_come_back() {
    let a = MockUpstream::start().await;
    let b = MockUpstream::start().await;
    let relay = Relay::start().await;
    relay.create_account("a", "claude", &a.url(), "sk-a").await;
    relay.create_account("b", "claude", &b.url(), "sk-b").await;
    let key = key_for(&relay, 2).await;
    let limited = r#"{"type":"error","error":{"type":"rate_limit_error","message":"Number of request tokens has exceeded your per-minute rate limit"}}"#;
    answer(&a, 429, limited);
    answer(&b, 429, limited);
    let ask = |topic: &str| {
        relay
            .post("/v1/messages", &key)
            .json(&messages_body(MODEL, false, conversation(topic, 1)))
            .send()
    };
    assert_eq!(ask("limited").await.unwrap().status(), 429);
    assert_eq!((a.count(), b.count()), (1, 1));
    // Both cool down (60 s by default): the next client is told when the first comes back.
    let r = ask("limited again").await.unwrap();
    assert_eq!(r.status(), 503);
    let retry_after: u64 = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After in seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "no_available_account", "{v}");
    assert_eq!(a.count() + b.count(), 2, "a cooling account was asked");
}

#[tokio::test]
async fn a_pool_cooling_for_an_overload_alone_is_still_tried() {
    let a = MockUpstream::start().await;
    let b = MockUpstream::start().await;
    let relay = Relay::start().await;
    relay.create_account("a", "claude", &a.url(), "sk-a").await;
    relay.create_account("b", "claude", &b.url(), "sk-b").await;
    let key = key_for(&relay, 2).await;
    let overloaded =
        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
    answer(&a, 529, overloaded);
    answer(&b, 529, overloaded);
    let ask = |topic: &str| {
        relay
            .post("/v1/messages", &key)
            .json(&messages_body(MODEL, false, conversation(topic, 1)))
            .send()
    };
    assert_eq!(ask("overloaded").await.unwrap().status(), 529);
    assert_eq!((a.count(), b.count()), (1, 1));
    // Both cool for 120 s; the overload is over sooner. The accounts are still tried, in
    // turn, instead of every client getting 503 for minutes.
    a.set(|m| m.status = 200);
    b.set(|m| m.status = 200);
    for i in 0..4 {
        let r = ask(&format!("after the overload {i}")).await.unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    }
    assert_eq!(a.count() + b.count(), 6);
    assert!(
        a.count() >= 2 && b.count() >= 2,
        "not spread: {} and {}",
        a.count(),
        b.count()
    );
}

/// An upstream that cuts its answers after their heads (a flaky endpoint behind a base URL)
/// cools as one that fails them: three cut answers in a row move the conversation to another
/// account. Whole answers in between end the row.
#[tokio::test]
async fn an_account_whose_answers_are_cut_cools_down() {
    let a = MockUpstream::start().await;
    let b = MockUpstream::start().await;
    let relay = Relay::start().await;
    relay.create_account("a", "claude", &a.url(), "sk-a").await;
    let key = key_for(&relay, 1).await;
    let ask = || async {
        let r = relay
            .post("/v1/messages", &key)
            .json(&messages_body(MODEL, true, conversation("cut short", 1)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await;
    };
    let cut = |on: bool| a.set(|m| m.cut_after = on.then_some(2));
    // Two cuts, a whole answer, two cuts: never three in a row.
    for on in [true, true, false, true, true] {
        cut(on);
        ask().await;
    }
    relay.create_account("b", "claude", &b.url(), "sk-b").await;
    relay.wait_accounts_loaded(2).await;
    cut(false);
    ask().await;
    assert_eq!((a.count(), b.count()), (6, 0), "the conversation left a");
    // Three cuts in a row: a cools, and the conversation moves to b.
    cut(true);
    for _ in 0..3 {
        ask().await;
    }
    cut(false);
    ask().await;
    assert_eq!((a.count(), b.count()), (9, 1));
}

/// A client that left while an attempt failed is not served by another account: the relay
/// does not fail over for nobody.
#[tokio::test]
async fn no_failover_for_a_client_that_left() {
    let a = MockUpstream::start().await;
    let b = MockUpstream::start().await;
    let relay = Relay::start().await;
    relay.create_account("a", "claude", &a.url(), "sk-a").await;
    relay.create_account("b", "claude", &b.url(), "sk-b").await;
    let key = key_for(&relay, 2).await;
    let overloaded =
        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
    for m in [&a, &b] {
        answer(m, 529, overloaded);
        m.set(|b| b.head_delay = Duration::from_secs(1));
    }
    // The client gives up before the first account answers.
    let gave_up = relay
        .post("/v1/messages", &key)
        .timeout(Duration::from_millis(300))
        .json(&messages_body(MODEL, false, conversation("impatient", 1)))
        .send()
        .await;
    assert!(gave_up.is_err(), "answered before the client left");
    let records = relay.wait_records(1).await;
    assert_eq!(records[0]["status"], 529, "{records:?}");
    assert_eq!(
        a.count() + b.count(),
        1,
        "failed over after the client left"
    );
}
