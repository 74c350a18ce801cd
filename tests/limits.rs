//! Per-key limits end to end: rpm, concurrency and cost limits with the statuses and error types
//! of DESIGN §4.

mod common;

use std::time::{Duration, Instant};

use common::mock_upstream::{MockUpstream, MockUsage};
use common::{conversation, messages_body, sum, Relay, RelayOptions};

const MODEL: &str = "claude-sonnet-4-5";

async fn setup(key_extra: serde_json::Value) -> (Relay, MockUpstream, String) {
    let mock = MockUpstream::start().await;
    let relay = Relay::start().await;
    relay
        .create_account("claude-a", "claude", &mock.url(), "sk-ant-a")
        .await;
    let user = relay.create_user("limited", 10_000).await;
    let (_, key) = relay.create_key(&user, key_extra).await;
    relay.wait_key_active(&key).await;
    (relay, mock, key)
}

/// A relay's options on a data directory of its own, to start it again on the same data.
fn on_disk(data: &tempfile::TempDir) -> RelayOptions {
    RelayOptions {
        data_dir: Some(data.path().to_path_buf()),
        ..RelayOptions::default()
    }
}

/// A relay on a fresh data directory (kept while the directory lives), with one account on
/// `mock`.
async fn relay_on_disk(mock: &MockUpstream) -> (tempfile::TempDir, Relay) {
    let data = tempfile::tempdir().expect("tempdir");
    let relay = Relay::start_with(on_disk(&data)).await;
    relay
        .create_account("claude-a", "claude", &mock.url(), "sk-ant-a")
        .await;
    (data, relay)
}

fn body(i: usize) -> serde_json::Value {
    messages_body(MODEL, false, conversation(&format!("limits {i}"), 1))
}

#[tokio::test]
async fn rpm_limit_answers_429_with_retry_after() {
    let (relay, mock, key) = setup(serde_json::json!({"rpm_limit": 3})).await;
    for i in 0..3 {
        let r = relay
            .post("/v1/messages", &key)
            .json(&body(i))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i}");
    }
    let r = relay
        .post("/v1/messages", &key)
        .json(&body(9))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&retry), "retry-after {retry}");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert_eq!(mock.count(), 3);
    assert_eq!(refusals(&relay, "rpm", "key", 429).await, 1);
}

/// `relay_limit_refusals_total` of one limit, whose and status (0 when never counted).
async fn refusals(relay: &Relay, limit: &str, whose: &str, status: u16) -> u64 {
    let text = relay.metrics_text().await;
    text.lines()
        .find(|l| {
            l.starts_with("relay_limit_refusals_total{")
                && l.contains(&format!(r#"limit="{limit}""#))
                && l.contains(&format!(r#"whose="{whose}""#))
                && l.contains(&format!(r#"status="{status}""#))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn concurrency_limit_holds_under_a_burst() {
    let (relay, mock, key) = setup(serde_json::json!({"max_concurrency": 5})).await;
    let hold = Duration::from_millis(400);
    mock.set(|b| b.head_delay = hold);
    let relay = std::sync::Arc::new(relay);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let relay = relay.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let r = relay
                .post("/v1/messages", &key)
                .json(&body(i))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let retry = r.headers().get("retry-after").is_some();
            let _ = r.bytes().await;
            (status, retry)
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let (status, retry) = t.await.unwrap();
        match status {
            200 => ok += 1,
            429 => assert!(retry, "429 without Retry-After"),
            other => panic!("unexpected status {other}"),
        }
    }
    // Each upstream request is held `hold` long: the largest number that started within one
    // hold window of each other is the peak concurrency the upstream saw.
    let mut starts: Vec<Instant> = mock.requests().iter().map(|r| r.at).collect();
    starts.sort();
    let peak = starts
        .iter()
        .map(|t| {
            starts
                .iter()
                .filter(|s| **s >= *t && **s < *t + hold)
                .count()
        })
        .max()
        .unwrap_or(0);
    assert!(peak <= 5, "{peak} requests upstream at once");
    assert!(peak >= 2, "the burst never ran concurrently (peak {peak})");
    assert_eq!(ok, mock.count());
    assert!(ok >= 5, "only {ok} requests served");
}

#[tokio::test]
async fn daily_cost_limit_is_not_overshot_by_more_than_in_flight() {
    // Each request: 1000 input + 1000 output tokens of claude-sonnet-4-5 = 3000 + 15000 = 18000 µUSD.
    let per_request = 18_000;
    let limit = 50_000;
    let (relay, mock, key) = setup(serde_json::json!({"daily_cost_limit": limit})).await;
    mock.set(|b| {
        b.usage = MockUsage::io(1000, 1000);
    });
    let mut served = 0;
    for i in 0..10 {
        let r = relay
            .post("/v1/messages", &key)
            .json(&body(i))
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            200 => {
                served += 1;
                let _ = r.bytes().await;
            }
            402 => {
                let v: serde_json::Value = r.json().await.unwrap();
                assert_eq!(v["error"]["type"], "insufficient_quota", "{v}");
                break;
            }
            s => panic!("unexpected status {s}"),
        }
    }
    // Sequential requests: one in flight at a time, so spend ends in [limit, limit + one request).
    let spent = served * per_request;
    assert!(
        spent >= limit && spent < limit + per_request,
        "served {served}, spent {spent}"
    );
    let records = relay.wait_records(served as usize).await;
    let booked = sum(&records, "billed_cost");
    assert_eq!(booked, spent);
}

#[tokio::test]
async fn total_cost_limit_answers_402() {
    let (relay, mock, key) = setup(serde_json::json!({"total_cost_limit": 1})).await;
    mock.set(|b| {
        b.usage = MockUsage::io(10, 10);
    });
    let r = relay
        .post("/v1/messages", &key)
        .json(&body(0))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await;
    let r = relay
        .post("/v1/messages", &key)
        .json(&body(1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 402);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "insufficient_quota");
}

/// A request allowing 1000 output tokens: the relay holds 1000 × 15 µUSD plus its body's
/// share (a few hundred bytes, under 200 µUSD) while it is in flight.
fn capped_body(i: usize) -> serde_json::Value {
    let mut b = body(i);
    b["max_tokens"] = serde_json::json!(1000);
    b
}

/// Posts `body` with `key`: the status and the error message, if any.
async fn attempt(relay: &Relay, key: &str, body: serde_json::Value) -> (u16, String) {
    let r = relay
        .post("/v1/messages", key)
        .json(&body)
        .send()
        .await
        .expect("the relay answers");
    let status = r.status().as_u16();
    let retry_after = r.headers().get("retry-after").is_some();
    let v: serde_json::Value = r.json().await.unwrap_or_default();
    match status {
        402 => assert_eq!(v["error"]["type"], "insufficient_quota", "{v}"),
        // Refused for what is in flight: passing, a rate limit to retry.
        429 => {
            assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
            assert!(retry_after, "429 without Retry-After: {v}");
        }
        _ => {}
    }
    (
        status,
        v["error"]["message"].as_str().unwrap_or("").to_string(),
    )
}

/// Ten capped requests for `model` at once: how many were served, and how many refused for
/// what the requests in flight hold (402s for the spend alone are let be; any other answer
/// fails).
async fn burst(relay: &std::sync::Arc<Relay>, key: &str, model: &str) -> (usize, usize) {
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let (relay, key, model) = (relay.clone(), key.to_string(), model.to_string());
            tokio::spawn(async move {
                let mut b = capped_body(i);
                b["model"] = serde_json::json!(model);
                attempt(&relay, &key, b).await
            })
        })
        .collect();
    let (mut served, mut in_flight) = (0, 0);
    for t in tasks {
        match t.await.expect("a request of the burst") {
            (200, _) => served += 1,
            (429, message) => {
                assert!(message.contains("in flight"), "{message}");
                in_flight += 1;
            }
            (402, _) => {}
            other => panic!("unexpected answer {other:?}"),
        }
    }
    (served, in_flight)
}

#[tokio::test]
async fn requests_in_flight_count_against_the_daily_cost_limit() {
    // Each request costs 18 000 µUSD (1000 input + 1000 output tokens) and holds about 15 150
    // while in flight. Under a 50 000 limit, a burst of 10 gets at most 4 in: 3 × 15 150 is
    // still under the limit, 4 × is not, and a finished request counts more than it held.
    let limit = 50_000;
    let (relay, mock, key) = setup(serde_json::json!({"daily_cost_limit": limit})).await;
    mock.set(|b| {
        b.usage = MockUsage::io(1000, 1000);
        // Long enough for the whole burst to arrive while the first ones are held.
        b.head_delay = Duration::from_secs(2);
    });
    let relay = std::sync::Arc::new(relay);
    let (served, in_flight_refusals) = burst(&relay, &key, MODEL).await;
    assert!((1..=4).contains(&served), "{served} of 10 served");
    assert_eq!(mock.count(), served);
    assert!(
        in_flight_refusals > 0,
        "no refusal was for the requests in flight"
    );
    let records = relay.wait_records(10).await;
    let booked = sum(&records, "billed_cost");
    assert_eq!(booked, served as i64 * 18_000);
    // Every hold was given back: what refuses now is the spend alone.
    let (status, message) = attempt(&relay, &key, capped_body(10)).await;
    assert_eq!(status, 402);
    assert!(!message.contains("in flight"), "{message}");
}

#[tokio::test]
async fn a_failed_request_gives_its_cost_hold_back() {
    // A 20 000 limit has room for one hold of about 15 150 at a time.
    let (relay, mock, key) = setup(serde_json::json!({"daily_cost_limit": 20_000})).await;
    mock.set(|b| {
        b.status = 400;
        b.error_body =
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"no"}}"#.into();
    });
    for i in 0..3 {
        let (status, message) = attempt(&relay, &key, capped_body(i)).await;
        assert_eq!(status, 400, "request {i}: {message}");
    }
    mock.set(|b| b.status = 200);
    let (status, message) = attempt(&relay, &key, capped_body(3)).await;
    assert_eq!(status, 200, "{message}");
}

/// A user's cost limit counts the spend of all its keys: a key without limits of its own is
/// refused once its user's other keys spent the limit, with a message naming the user's limit,
/// also after a restart (the counters start from the stored spend); removing the user's limit
/// lets it through.
#[tokio::test]
async fn a_user_cost_limit_holds_over_all_its_keys() {
    let mock = MockUpstream::start().await;
    let (data, relay) = relay_on_disk(&mock).await;
    let user = relay.create_user("shared", 10_000).await;
    // Each request costs 18 000 µUSD: two fit under 30 000, a third does not.
    let (status, v) = relay
        .patch_user(&user, serde_json::json!({"total_cost_limit": 30_000}))
        .await;
    assert_eq!(status, 200, "{v}");
    let (_, first) = relay.create_key(&user, serde_json::json!({})).await;
    let (_, second) = relay.create_key(&user, serde_json::json!({})).await;
    let other_user = relay.create_user("other", 10_000).await;
    let (_, other) = relay.create_key(&other_user, serde_json::json!({})).await;
    for key in [&first, &second, &other] {
        relay.wait_key_active(key).await;
    }
    mock.set(|b| b.usage = MockUsage::io(1000, 1000));
    for (i, key) in [&first, &second].into_iter().enumerate() {
        let (status, message) = attempt(&relay, key, body(i)).await;
        assert_eq!(status, 200, "request {i}: {message}");
        relay.wait_records(i + 1).await;
    }
    for (i, key) in [&first, &second].into_iter().enumerate() {
        let (status, message) = attempt(&relay, key, body(10 + i)).await;
        assert_eq!(status, 402, "key {i}: {message}");
        assert!(message.contains("user"), "{message}");
        assert!(message.contains("total cost limit"), "{message}");
    }
    // Another user's key is not held up.
    let (status, message) = attempt(&relay, &other, body(20)).await;
    assert_eq!(status, 200, "{message}");
    assert_eq!(mock.count(), 3);
    relay.wait_records(5).await;
    drop(relay);
    let relay = Relay::start_with(on_disk(&data)).await;
    relay.wait_key_active(&second).await;
    let (status, message) = attempt(&relay, &second, body(21)).await;
    assert_eq!(status, 402, "after a restart: {message}");
    assert!(message.contains("user"), "{message}");
    // Without the user's limit the keys serve again.
    let (status, v) = relay
        .patch_user(&user, serde_json::json!({"total_cost_limit": null}))
        .await;
    assert_eq!(status, 200, "{v}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, message) = attempt(&relay, &second, body(30)).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 402, "{message}");
        assert!(Instant::now() < deadline, "the removed limit still refuses");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Monthly cost limits, of a key and of a user over all its keys: the month's spend refuses
/// with 402 and says when it resets; the key list shows what the month has billed.
#[tokio::test]
async fn monthly_cost_limits_refuse_keys_and_users() {
    let mock = MockUpstream::start().await;
    let relay = Relay::start().await;
    relay
        .create_account("claude-a", "claude", &mock.url(), "sk-ant-a")
        .await;
    mock.set(|b| b.usage = MockUsage::io(1000, 1000));
    // Each request costs 18 000 µUSD: two fit under 30 000, a third does not.
    let owner = relay.create_user("monthly-key", 10_000).await;
    let (key_id, key) = relay
        .create_key(&owner, serde_json::json!({"monthly_cost_limit": 30_000}))
        .await;
    let user = relay.create_user("monthly-user", 10_000).await;
    let (status, v) = relay
        .patch_user(&user, serde_json::json!({"monthly_cost_limit": 30_000}))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["monthly_cost_limit"], 30_000);
    let (_, first) = relay.create_key(&user, serde_json::json!({})).await;
    let (_, second) = relay.create_key(&user, serde_json::json!({})).await;
    for k in [&key, &first, &second] {
        relay.wait_key_active(k).await;
    }
    let mut served = 0;
    for (i, k) in [&key, &key, &first, &second].into_iter().enumerate() {
        let (status, message) = attempt(&relay, k, body(i)).await;
        assert_eq!(status, 200, "request {i}: {message}");
        served += 1;
        relay.wait_records(served).await;
    }
    let (status, message) = attempt(&relay, &key, body(10)).await;
    assert_eq!(status, 402, "{message}");
    assert!(
        message.contains("this API key has reached its monthly cost limit"),
        "{message}"
    );
    assert!(message.contains("first of next month"), "{message}");
    for k in [&first, &second] {
        let (status, message) = attempt(&relay, k, body(11)).await;
        assert_eq!(status, 402, "{message}");
        assert!(message.contains("user's monthly cost limit"), "{message}");
    }
    assert_eq!(mock.count(), 4);
    // Counted by limit, whose and status.
    assert_eq!(refusals(&relay, "monthly_cost", "key", 402).await, 1);
    assert_eq!(refusals(&relay, "monthly_cost", "user", 402).await, 2);

    let keys = relay
        .admin_get(&format!("/api/admin/api-keys?user_id={owner}"))
        .await;
    let listed = keys["items"]
        .as_array()
        .and_then(|items| items.iter().find(|k| k["id"] == key_id.as_str()))
        .cloned()
        .unwrap_or_default();
    assert_eq!(listed["monthly_cost_limit"], 30_000, "{keys}");
    assert_eq!(listed["billed_cost_month"], 36_000, "{keys}");
    assert_eq!(listed["billed_cost_today"], 36_000, "{keys}");

    // Raised, the key serves again.
    let (status, v) = relay
        .admin_patch(
            &format!("/api/admin/api-keys/{key_id}"),
            serde_json::json!({"monthly_cost_limit": 100_000}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, message) = attempt(&relay, &key, body(20)).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 402, "{message}");
        assert!(Instant::now() < deadline, "the raised limit still refuses");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A negative limit is refused.
    let (status, v) = relay
        .patch_user(&user, serde_json::json!({"monthly_cost_limit": -1}))
        .await;
    assert_eq!(status, 400, "{v}");
    assert!(v.to_string().contains("monthly_cost_limit"), "{v}");
}

/// A relay started mid-month counts what the month's earlier days billed (from the stored
/// daily rollups), not what the month before billed.
#[tokio::test]
async fn a_restarted_relay_counts_the_months_earlier_days() {
    let mock = MockUpstream::start().await;
    let (data, relay) = relay_on_disk(&mock).await;
    let user = relay.create_user("month-start", 10_000).await;
    let (key_id, key) = relay
        .create_key(&user, serde_json::json!({"monthly_cost_limit": 30_000}))
        .await;
    drop(relay);

    // Billed before: 20 000 on the month's first day, 50 000 on the last day of the month
    // before. Each request costs 18 000: with this month's 20 000 one fits, a second does not;
    // with last month's counted too, none would.
    const DAY: i64 = 86_400_000;
    let now = relay_filters::now_ms();
    let mut first = now - now.rem_euclid(DAY);
    while !relay_filters::key_limits::utc_day(first).ends_with("-01") {
        first -= DAY;
    }
    let earlier = |id: &str, at: i64, billed: i64| relay_filters::UsageRecord {
        id: id.into(),
        created_at: at,
        user_id: Some(user.clone()),
        api_key_id: Some(key_id.clone()),
        protocol: "anthropic".into(),
        status: 200,
        billed_cost: billed,
        ..Default::default()
    };
    let url = format!("sqlite://{}", data.path().join("relay.db").display());
    let store = llm_relay::store::SqlStore::connect(&url, 1)
        .await
        .expect("the relay's database");
    store
        .insert_usage_batch(&[
            earlier("this-month", first + 3_600_000, 20_000),
            earlier("last-month", first - DAY + 3_600_000, 50_000),
        ])
        .await
        .expect("earlier records");
    store.close().await;

    let relay = Relay::start_with(on_disk(&data)).await;
    relay.wait_key_active(&key).await;
    mock.set(|b| b.usage = MockUsage::io(1000, 1000));
    let (status, message) = attempt(&relay, &key, body(0)).await;
    assert_eq!(status, 200, "{message}");
    relay.wait_records(3).await;
    let (status, message) = attempt(&relay, &key, body(1)).await;
    assert_eq!(status, 402, "{message}");
    assert!(message.contains("monthly cost limit"), "{message}");
    assert_eq!(mock.count(), 1);
}

/// A request refused for want of a concurrency slot does not use up the key's requests per
/// minute: once the slot is free, the next requests are served.
#[tokio::test]
async fn concurrency_refusals_do_not_use_up_the_rpm_limit() {
    let (relay, mock, key) = setup(serde_json::json!({"rpm_limit": 3, "max_concurrency": 1})).await;
    mock.set(|b| b.head_delay = Duration::from_secs(3));
    let relay = std::sync::Arc::new(relay);
    let held = {
        let (relay, key) = (relay.clone(), key.clone());
        tokio::spawn(async move { attempt(&relay, &key, body(0)).await })
    };
    // The first request holds the slot once the upstream has it.
    while mock.count() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for i in 0..3 {
        let (status, message) = attempt(&relay, &key, body(1)).await;
        assert_eq!(status, 429, "attempt {i}: {message}");
        assert!(message.contains("concurrent"), "attempt {i}: {message}");
    }
    let (status, message) = held.await.unwrap();
    assert_eq!(status, 200, "{message}");
    mock.set(|b| b.head_delay = Duration::ZERO);
    // 1 served and 3 refused for concurrency: the rpm limit of 3 has room for 2 more.
    for i in 0..2 {
        let (status, message) = attempt(&relay, &key, body(2 + i)).await;
        assert_eq!(
            status, 200,
            "request {i} after the slot came back: {message}"
        );
    }
}

/// A client that leaves mid-stream gives its key's concurrency slot back at once, while the
/// relay still drains the upstream's answer to book it: a user who stops an answer and asks
/// again is served. Drained answers have as many slots of their own: a second stop while the
/// first answer still drains keeps its slot, so the key never has more than twice its cap at
/// the upstream.
#[tokio::test]
async fn a_client_that_leaves_gives_its_slot_back_before_the_drain_ends() {
    use futures::StreamExt;
    let (relay, mock, key) = setup(serde_json::json!({"max_concurrency": 1})).await;
    mock.set(|b| {
        b.deltas = 60;
        b.event_delay = Duration::from_millis(100);
    });
    // A stream whose client reads its first chunk and leaves.
    let stop = |topic: &'static str| {
        let (relay, key) = (&relay, &key);
        async move {
            let r = relay
                .post("/v1/messages", key)
                .json(&messages_body(MODEL, true, conversation(topic, 1)))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let mut stream = r.bytes_stream();
            stream.next().await.expect("first chunk").unwrap();
        }
    };
    // Asks until served; how many times it was refused for want of a slot.
    let deadline = Instant::now() + Duration::from_secs(30);
    let ask_until_served = |i: usize| {
        let (relay, key) = (&relay, &key);
        async move {
            let mut refused = 0;
            loop {
                let (status, message) = attempt(relay, key, body(i)).await;
                if status == 200 {
                    return refused;
                }
                assert_eq!(status, 429, "{message}");
                refused += 1;
                assert!(Instant::now() < deadline, "never served again");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    stop("stopped").await;
    let mut refused = ask_until_served(1).await;
    assert_eq!(
        *mock.streams_completed.lock().unwrap(),
        0,
        "the slot came back only once the first answer was drained"
    );
    // A second stop while the first answer drains: no slot for it to drain in, so it keeps
    // the key's until the upstream is done with one of them.
    stop("stopped again").await;
    refused += ask_until_served(2).await;
    assert!(
        *mock.streams_completed.lock().unwrap() >= 1,
        "served with two answers at the upstream"
    );
    // The drained answers are still booked: every request has its record.
    let records = relay.wait_records(refused + 4).await;
    let streamed: Vec<_> = records.iter().filter(|r| r["stream"] == true).collect();
    assert_eq!(streamed.len(), 2, "{records:?}");
    assert!(streamed.iter().all(|r| r["status"] == 200), "{records:?}");
}

/// A model with no price of its own (an alias an account maps to a priced model) holds what
/// the mapped model may cost: under a daily limit, a burst of alias requests is held back as
/// one of the priced model is.
#[tokio::test]
async fn an_alias_holds_the_cost_of_the_model_it_is_mapped_to() {
    let mock = MockUpstream::start().await;
    let relay = Relay::start().await;
    let account = relay
        .create_account("claude-a", "claude", &mock.url(), "sk-ant-a")
        .await;
    let (status, v) = relay
        .patch_account(
            &account,
            serde_json::json!({"model_map": {"house-model": MODEL}}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let user = relay.create_user("alias", 10_000).await;
    let (_, key) = relay
        .create_key(&user, serde_json::json!({"daily_cost_limit": 50_000}))
        .await;
    relay.wait_key_active(&key).await;
    mock.set(|b| {
        b.usage = MockUsage::io(1000, 1000);
        b.head_delay = Duration::from_secs(2);
    });
    let relay = std::sync::Arc::new(relay);
    let (served, _) = burst(&relay, &key, "house-model").await;
    // As for the priced model itself: about 15 150 held each, so at most 4 under 50 000.
    assert!((1..=4).contains(&served), "{served} of 10 served");
    assert_eq!(mock.count(), served);
}

/// A model without a price is billed nothing, so a cost limit could not hold it: refused for a
/// key or a user with a cost limit, served (and flagged unpriced) for the others.
#[tokio::test]
async fn a_model_without_a_price_is_refused_under_a_cost_limit() {
    let mock = MockUpstream::start().await;
    let relay = Relay::start().await;
    relay
        .create_account("claude-a", "claude", &mock.url(), "sk-ant-a")
        .await;
    let body = |model: &str| {
        messages_body(
            model,
            false,
            serde_json::json!([{"role": "user", "content": "hi"}]),
        )
    };
    let limited = relay.create_user("limited-key", 10_000).await;
    let (_, limited_key) = relay
        .create_key(&limited, serde_json::json!({"total_cost_limit": 1_000_000}))
        .await;
    let capped_user = relay.create_user("limited-user", 10_000).await;
    let (status, v) = relay
        .patch_user(
            &capped_user,
            serde_json::json!({"daily_cost_limit": 1_000_000}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let (_, capped_user_key) = relay.create_key(&capped_user, serde_json::json!({})).await;
    let free = relay.active_key("unlimited").await;
    relay.wait_key_active(&limited_key).await;
    relay.wait_key_active(&capped_user_key).await;

    for (key, whose) in [
        (&limited_key, "this API key has"),
        (&capped_user_key, "this API key's user has"),
    ] {
        let r = relay
            .post_json("/v1/messages", key, &body("house-unpriced"))
            .await;
        assert_eq!(r.status(), 403);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "permission_error", "{v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("house-unpriced"), "{message}");
        assert!(message.contains(whose), "{message}");
        // A priced model is served.
        let r = relay.post_json("/v1/messages", key, &body(MODEL)).await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(mock.count(), 2, "the refused requests never went upstream");
    for whose in ["key", "user"] {
        assert_eq!(
            refusals(&relay, "unpriced_model", whose, 403).await,
            1,
            "{whose}"
        );
    }
    mock.set(|b| b.model = "house-unpriced".into());
    let r = relay
        .post_json("/v1/messages", &free, &body("house-unpriced"))
        .await;
    assert_eq!(r.status(), 200);
    let records = relay.wait_records(5).await;
    let unpriced: Vec<_> = records.iter().filter(|r| r["unpriced"] == true).collect();
    assert_eq!(unpriced.len(), 1, "{records:?}");
}

/// A user's platforms and models hold for every key of the user, also the keys the user makes
/// itself: an admin's restriction is not undone by a new key.
#[tokio::test]
async fn a_users_allow_lists_hold_for_keys_it_makes_itself() {
    let mock = MockUpstream::start().await;
    let relay = Relay::start().await;
    relay
        .create_account("claude-a", "claude", &mock.url(), "sk-ant-a")
        .await;
    relay
        .create_account("openai-a", "openai", &mock.url(), "sk-openai-a")
        .await;
    let user = relay.create_user("ivy", 10_000).await;
    let (status, v) = relay
        .patch_user(
            &user,
            serde_json::json!({"allowed_platforms": ["claude"], "allowed_models": ["claude-haiku-*"]}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["allowed_models"],
        serde_json::json!(["claude-haiku-*"]),
        "{v}"
    );
    let (status, v) = relay
        .patch_user(&user, serde_json::json!({"allowed_platforms": ["mars"]}))
        .await;
    assert_eq!(status, 400, "{v}");

    // The tenant makes a key of its own, with no lists.
    let session = relay.login("ivy", "password-123").await;
    let (status, text) = relay
        .session_call(
            &session,
            reqwest::Method::POST,
            "/api/keys",
            Some(serde_json::json!({"name": "mine"})),
            true,
        )
        .await;
    assert_eq!(status, 201, "{text}");
    let created: serde_json::Value = serde_json::from_str(&text).unwrap();
    let key = created["key"].as_str().unwrap().to_string();
    relay.wait_key_active(&key).await;
    let ask = |model: &'static str| {
        let key = key.clone();
        let relay = &relay;
        async move {
            let body = messages_body(
                model,
                false,
                serde_json::json!([{"role": "user", "content": "hi"}]),
            );
            relay
                .post_json("/v1/messages", &key, &body)
                .await
                .status()
                .as_u16()
        }
    };
    assert_eq!(ask(MODEL).await, 403);
    assert_eq!(ask("claude-haiku-4-5").await, 200);
    let chat = serde_json::json!({"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "hi"}]});
    let r = relay.post_json("/v1/chat/completions", &key, &chat).await;
    assert_eq!(r.status(), 403, "the openai platform is not the user's");
    let listed: serde_json::Value = relay
        .http
        .get(format!("{}/v1/models", relay.proxy))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert!(!ids.is_empty(), "{listed}");
    assert!(
        ids.iter().all(|id| id.starts_with("claude-haiku-")),
        "{ids:?}"
    );

    // Lifted: the key is served every model again (once the proxy's cache has it).
    let (status, v) = relay
        .patch_user(
            &user,
            serde_json::json!({"allowed_platforms": [], "allowed_models": []}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while ask(MODEL).await != 200 {
        assert!(
            Instant::now() < deadline,
            "the lifted lists never reached the proxy"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
