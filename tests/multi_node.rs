//! Two relay nodes on one PostgreSQL and one Redis behave as one relay: conversations stay on
//! their account whichever node they hit, cooldowns and admin changes reach the other node.

mod common;

use std::time::{Duration, Instant};

use common::mock_upstream::MockUpstream;
use common::{conversation, messages_body, sum, Db, PgDb, Relay, RelayOptions};

const MODEL: &str = "claude-sonnet-4-5";

/// The Redis the nodes share (`RELAY_TEST_REDIS_URL`, else the standard local port).
fn redis_url() -> String {
    std::env::var("RELAY_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A connection to [`redis_url`], to read what the nodes stored there.
async fn test_redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .expect("the Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("Redis reachable")
}

async fn two_nodes() -> (PgDb, Relay, Relay) {
    let pg = PgDb::create().await;
    let redis = redis_url();
    // A loaded machine must not pass for an unreachable Redis.
    let shared = vec![
        ("RELAY_REDIS_URL".to_string(), redis),
        ("RELAY_REDIS_OP_TIMEOUT".to_string(), "2s".to_string()),
    ]
    .into_iter()
    .chain(common::shared_node_secrets())
    .collect::<Vec<_>>();
    let a = Relay::start_with(RelayOptions {
        db: Db::Postgres(pg.url.clone()),
        env: shared.clone(),
        ..Default::default()
    })
    .await;
    let b = Relay::start_with(RelayOptions {
        db: Db::Postgres(pg.url.clone()),
        env: shared,
        ..Default::default()
    })
    .await;
    (pg, a, b)
}

#[tokio::test]
async fn two_nodes_share_bindings_cooldowns_and_admin_changes() {
    let (_pg, a, b) = two_nodes().await;
    let mock_1 = MockUpstream::start().await;
    let mock_2 = MockUpstream::start().await;
    a.create_account("claude-1", "claude", &mock_1.url(), "sk-ant-1")
        .await;
    a.create_account("claude-2", "claude", &mock_2.url(), "sk-ant-2")
        .await;
    let user = a.create_user("multi", 10_000).await;
    let (key_id, key) = a.create_key(&user, serde_json::json!({})).await;
    a.wait_key_active(&key).await;
    b.wait_key_active(&key).await;

    // Conversations whose turns alternate between the nodes stay on one account.
    for c in 0..6 {
        let topic = format!("multi {c}");
        let before = (mock_1.count(), mock_2.count());
        for turn in 1..=4 {
            let node = if turn % 2 == 0 { &b } else { &a };
            let r = node
                .post("/v1/messages", &key)
                .json(&messages_body(MODEL, false, conversation(&topic, turn)))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
        let d = (mock_1.count() - before.0, mock_2.count() - before.1);
        assert!(
            d == (4, 0) || d == (0, 4),
            "conversation {c} split across accounts: {d:?}"
        );
    }

    // A 429 on node A puts the account in cooldown; node B does not pick it either.
    mock_1.set(|b| {
        b.status = 429;
        b.error_body =
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#.into();
        b.extra_headers = vec![("retry-after".into(), "120".into())];
    });
    // Node A sends new conversations until one is picked for account 1 (which fails over).
    let mut i = 0;
    let base_1 = mock_1.count();
    while mock_1.count() == base_1 {
        let r = a
            .post("/v1/messages", &key)
            .json(&messages_body(
                MODEL,
                false,
                conversation(&format!("cool {i}"), 1),
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "failover to account 2 failed");
        i += 1;
        assert!(i < 100, "account 1 was never picked");
    }
    let hits_1 = mock_1.count();
    // The cooldown reaches node B (its refresh loop shows it in B's account states).
    b.wait_metric("relay_account_state{platform=\"claude\",state=\"cooling\"} 1")
        .await;
    for i in 0..10 {
        let r = b
            .post("/v1/messages", &key)
            .json(&messages_body(
                MODEL,
                false,
                conversation(&format!("after {i}"), 1),
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i} on node B");
    }
    assert_eq!(
        mock_1.count(),
        hits_1,
        "node B sent requests to the account cooling down on node A"
    );

    // A key disabled through node A's admin API is refused by node B at its next refresh
    // (every 100 ms here; the deadline allows for a loaded machine).
    let (st, _) = a
        .admin_patch(
            &format!("/api/admin/api-keys/{key_id}"),
            serde_json::json!({"enabled": false}),
        )
        .await;
    assert_eq!(st, 200);
    let changed = Instant::now();
    loop {
        let r = b
            .post("/v1/messages", &key)
            .json(&messages_body(MODEL, false, conversation("off", 1)))
            .send()
            .await
            .unwrap();
        if r.status() == 401 {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(3),
            "node B still accepts the disabled key"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_operator_ends_a_cooldown_on_every_node() {
    let (_pg, a, b) = two_nodes().await;
    let limited = MockUpstream::start().await;
    let good = MockUpstream::start().await;
    // Some 30 years asked for; a few hours held.
    limited.set(|b| {
        b.status = 429;
        b.error_body =
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#.into();
        b.extra_headers = vec![("retry-after".into(), "1000000000".into())];
    });
    let limited_id = a
        .create_account_with(serde_json::json!({"name": "limited", "type": "claude", "base_url": limited.url(), "credential": "sk-ant-l", "priority": 1}))
        .await;
    a.create_account("good", "claude", &good.url(), "sk-ant-g")
        .await;
    let user = a.create_user("clear", 10_000).await;
    let (_, key) = a.create_key(&user, serde_json::json!({})).await;
    for node in [&a, &b] {
        node.wait_key_active(&key).await;
        node.wait_accounts_loaded(2).await;
    }
    let ask = |node: &Relay, topic: String| {
        node.post("/v1/messages", &key)
            .json(&messages_body(MODEL, false, conversation(&topic, 1)))
            .send()
    };

    // A 429 on node A cools the account on both nodes, in Redis and in the database.
    assert_eq!(ask(&a, "one".into()).await.unwrap().status(), 200);
    assert_eq!((limited.count(), good.count()), (1, 1));
    a.wait_stored_cooldown(&limited_id).await;
    b.wait_metric("relay_account_state{platform=\"claude\",state=\"cooling\"} 1")
        .await;
    let redis = test_redis().await;
    let shared_key = format!("account:cooldown:{limited_id}");
    let shared = || {
        let mut redis = redis.clone();
        let shared_key = shared_key.clone();
        async move {
            redis::cmd("EXISTS")
                .arg(shared_key)
                .query_async::<i64>(&mut redis)
                .await
                .unwrap()
        }
    };
    assert_eq!(shared().await, 1, "the cooldown is not in Redis");
    assert_eq!(ask(&b, "two".into()).await.unwrap().status(), 200);
    assert_eq!(limited.count(), 1, "node B tried the cooling account");

    // The operator puts it back through node A: node A uses it at once, node B at its next
    // refresh (every 100 ms here; the deadline allows for a loaded machine).
    limited.set(|b| *b = common::mock_upstream::Behavior::default());
    let (status, v) = a
        .patch_account(&limited_id, serde_json::json!({"status": "valid"}))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(shared().await, 0, "the cooldown is still in Redis");
    assert_eq!(ask(&a, "three".into()).await.unwrap().status(), 200);
    assert_eq!(limited.count(), 2, "node A still holds the cooldown");
    let cleared = Instant::now();
    for i in 0.. {
        let before = limited.count();
        assert_eq!(ask(&b, format!("b {i}")).await.unwrap().status(), 200);
        if limited.count() > before {
            break;
        }
        assert!(
            cleared.elapsed() < Duration::from_secs(10),
            "node B still holds the cooldown"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And keeps it ended over the refreshes that follow.
    b.wait_metric("relay_account_state{platform=\"claude\",state=\"available\"} 2")
        .await;
    let before = limited.count();
    assert_eq!(ask(&b, "last".into()).await.unwrap().status(), 200);
    assert_eq!(
        limited.count(),
        before + 1,
        "node B cools the account again"
    );
}

#[tokio::test]
async fn requests_in_flight_on_both_nodes_count_against_one_cost_limit() {
    let (_pg, a, b) = two_nodes().await;
    let mock = MockUpstream::start().await;
    // Each request costs 18 000 µUSD (1000 input + 1000 output tokens) and holds about 15 150
    // while in flight; a 50 000 limit lets at most 4 in at once, whichever node they reach.
    mock.set(|m| {
        m.usage = common::mock_upstream::MockUsage::io(1000, 1000);
        // Long enough for the whole burst to arrive while the first ones are held.
        m.head_delay = Duration::from_secs(2);
    });
    a.create_account("claude-1", "claude", &mock.url(), "sk-ant-1")
        .await;
    let user = a.create_user("shared-limit", 10_000).await;
    let (_, key) = a
        .create_key(&user, serde_json::json!({"daily_cost_limit": 50_000}))
        .await;
    a.wait_key_active(&key).await;
    b.wait_key_active(&key).await;
    let nodes = std::sync::Arc::new((a, b));
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let (nodes, key) = (nodes.clone(), key.clone());
            tokio::spawn(async move {
                let node = if i % 2 == 0 { &nodes.0 } else { &nodes.1 };
                let mut body = messages_body(MODEL, false, conversation(&format!("cap {i}"), 1));
                body["max_tokens"] = serde_json::json!(1000);
                let r = node
                    .post("/v1/messages", &key)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let _ = r.bytes().await;
                status
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        statuses.iter().all(|s| [200, 402, 429].contains(s)),
        "{statuses:?}"
    );
    assert!(
        (1..=4).contains(&served),
        "{served} of 10 served: {statuses:?}"
    );
    assert!(
        statuses.contains(&429),
        "no refusal for what is in flight: {statuses:?}"
    );
    assert_eq!(mock.count(), served);
    // Both nodes now see the spend (72 000 at 4 served, at least 18 000) and nothing held.
    let (a, b) = (&nodes.0, &nodes.1);
    let records = a.wait_records(10).await;
    let booked = sum(&records, "billed_cost");
    assert_eq!(booked, served as i64 * 18_000);
    if served >= 3 {
        for node in [a, b] {
            let r = node
                .post("/v1/messages", &key)
                .json(&messages_body(MODEL, false, conversation("after", 1)))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 402);
        }
    }
}

/// `{limit: 30 000}`: with [`limited_key_on_both`]'s requests, the second reaches it.
fn json_limit(limit: &str) -> serde_json::Value {
    serde_json::json!({ limit: 30_000 })
}

/// An account on a mock answering 1000 input and 1000 output tokens (18 000 µUSD a request),
/// made through `a`, and a new user's key with `limits`, active on both nodes: (mock, key id,
/// key).
async fn limited_key_on_both(
    a: &Relay,
    b: &Relay,
    user: &str,
    limits: serde_json::Value,
) -> (MockUpstream, String, String) {
    let mock = MockUpstream::start().await;
    mock.set(|m| m.usage = common::mock_upstream::MockUsage::io(1000, 1000));
    a.create_account("claude-1", "claude", &mock.url(), "sk-ant-1")
        .await;
    let user = a.create_user(user, 10_000).await;
    let (key_id, key) = a.create_key(&user, limits).await;
    a.wait_key_active(&key).await;
    b.wait_key_active(&key).await;
    (mock, key_id, key)
}

/// A key's monthly limit counts what every node booked (through Redis): each node booked one
/// request, under the limit alone, and both refuse once the two together are over it.
#[tokio::test]
async fn a_monthly_cost_limit_counts_the_spend_of_both_nodes() {
    let (_pg, a, b) = two_nodes().await;
    // Each request costs 18 000 µUSD: one on each node, then the month's 36 000 is over.
    let (mock, key_id, key) =
        limited_key_on_both(&a, &b, "monthly-shared", json_limit("monthly_cost_limit")).await;
    // The month's counter in Redis (the relays' key prefix is empty), read until it holds a
    // request's booking: the record can be stored a moment before its cost is.
    let redis = test_redis().await;
    let month = relay_filters::key_limits::utc_day(relay_filters::now_ms())[..7].to_string();
    let counter = format!("cost:apikey:monthly:{key_id}:{month}");
    let booked = |want: i64| {
        let (mut redis, counter) = (redis.clone(), counter.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let got: Option<i64> = redis::cmd("GET")
                    .arg(&counter)
                    .query_async(&mut redis)
                    .await
                    .unwrap();
                if got == Some(want) {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "{counter} is {got:?}, not {want}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let ask = |node: &Relay, i: usize| {
        node.post("/v1/messages", &key)
            .json(&messages_body(
                MODEL,
                false,
                conversation(&format!("month {i}"), 1),
            ))
            .send()
    };
    let r = ask(&a, 0).await.unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await;
    booked(18_000).await;
    let r = ask(&b, 1).await.unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await;
    booked(36_000).await;
    for (i, node) in [&a, &b].into_iter().enumerate() {
        let r = ask(node, 10 + i).await.unwrap();
        assert_eq!(r.status(), 402, "node {i}");
        let v: serde_json::Value = r.json().await.unwrap();
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("monthly cost limit"), "node {i}: {v}");
    }
    assert_eq!(mock.count(), 2);
}

#[tokio::test]
async fn an_accounts_concurrency_cap_holds_across_the_nodes() {
    let (_pg, a, b) = two_nodes().await;
    let mock = MockUpstream::start().await;
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    let held = gate.clone();
    mock.set(|m| m.second_event_gate = Some(held));
    a.create_account_with(serde_json::json!({
        "name": "capped", "type": "claude", "base_url": mock.url(),
        "credential": "sk-ant-capped", "max_concurrency": 1,
    }))
    .await;
    let user = a.create_user("capped", 10_000).await;
    let (_, key) = a.create_key(&user, serde_json::json!({})).await;
    a.wait_key_active(&key).await;
    b.wait_key_active(&key).await;
    b.wait_accounts_loaded(1).await;

    // A stream on node a holds the account's one slot.
    let mut stream = a
        .post("/v1/messages", &key)
        .json(&messages_body(MODEL, true, conversation("held", 1)))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let first = tokio::time::timeout(Duration::from_secs(10), stream.chunk())
        .await
        .expect("the first event")
        .unwrap();
    assert!(first.is_some());
    // Node b has room by its own count; across the nodes the account is full.
    let r = b
        .post("/v1/messages", &key)
        .json(&messages_body(MODEL, false, conversation("second", 1)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "{}", r.text().await.unwrap_or_default());
    assert_eq!(mock.count(), 1);

    // The stream ends, its slot given back before the client has the end of it: a request
    // that follows at once, on node b, is served.
    gate.notify_one();
    let _ = stream.bytes().await.unwrap();
    let r = b
        .post("/v1/messages", &key)
        .json(&messages_body(MODEL, false, conversation("third", 1)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    assert_eq!(mock.count(), 2);
}

/// Without Redis each node counts cost limits in its own memory; every `spend_refresh_interval`
/// it raises those counters to the spend all nodes stored, so a key spent on one node is
/// refused on the other too.
#[tokio::test]
async fn without_redis_a_node_learns_the_spend_of_the_others_from_the_database() {
    let pg = PgDb::create().await;
    let env = vec![(
        "RELAY_SPEND_REFRESH_INTERVAL".to_string(),
        "200ms".to_string(),
    )]
    .into_iter()
    .chain(common::shared_node_secrets())
    .collect::<Vec<_>>();
    let node = || {
        Relay::start_with(RelayOptions {
            db: Db::Postgres(pg.url.clone()),
            env: env.clone(),
            ..Default::default()
        })
    };
    let (a, b) = (node().await, node().await);
    // 18 000 µUSD a request: two reach the limit.
    let (mock, _, key) =
        limited_key_on_both(&a, &b, "two-nodes", json_limit("total_cost_limit")).await;
    let send = |node: &Relay, topic: &str| {
        node.post("/v1/messages", &key)
            .json(&messages_body(MODEL, false, conversation(topic, 1)))
            .send()
    };
    for topic in ["one", "two"] {
        assert_eq!(send(&a, topic).await.unwrap().status(), 200);
    }
    assert_eq!(send(&a, "three").await.unwrap().status(), 402);
    a.wait_records(3).await;
    // What the other node serves meanwhile costs nothing: only the stored spend can stop it.
    mock.set(|m| m.usage = common::mock_upstream::MockUsage::io(0, 0));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = send(&b, "elsewhere").await.unwrap().status();
        if status == 402 {
            break;
        }
        assert_eq!(status, 200);
        assert!(
            Instant::now() < deadline,
            "the other node never learned the spend"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
