//! Per-key limits in Redis are shared by nodes: two limit stores on one Redis (two nodes) see
//! one rpm budget, one set of concurrency slots and one cost counter; a slot a dead node never
//! gave back frees itself, and one Redis took while its answer came late is given back.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use llm_relay::store::redis_limits::RedisLimits;
use llm_relay::store::RedisLink;
use relay_filters::key_limits::{CostLimitHit, CostLimits, LimitStore, MemoryLimits, Spent};

fn redis_url() -> String {
    std::env::var("RELAY_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

async fn two_nodes() -> (RedisLimits, RedisLimits, String) {
    let prefix = format!("relaytest:{}:", uuid::Uuid::now_v7().simple());
    let node = || async {
        let link = RedisLink::open(&redis_url()).expect("redis url");
        assert!(link.ready(Duration::from_secs(5)).await, "Redis reachable");
        RedisLimits::new(link, &prefix, Arc::new(MemoryLimits::default()))
    };
    let a = node().await;
    let b = node().await;
    (a, b, prefix)
}

async fn cleanup(prefix: &str) {
    let client = redis::Client::open(redis_url()).expect("client");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("connection");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut c)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: Result<i64, _> = redis::cmd("DEL").arg(keys).query_async(&mut c).await;
    }
}

#[tokio::test]
async fn rpm_budget_is_shared() {
    let (a, b, prefix) = two_nodes().await;
    let now = 1_000_000;
    for i in 0..4 {
        let node = if i % 2 == 0 { &a } else { &b };
        assert!(node.hit_rpm("key", 4, now).await.is_ok(), "request {i}");
    }
    assert_eq!(a.hit_rpm("key", 4, now).await, Err(15));
    assert_eq!(b.hit_rpm("key", 4, now).await, Err(15));
    assert!(b.hit_rpm("key", 4, now + 15_000).await.is_ok());
    cleanup(&prefix).await;
}

#[tokio::test]
async fn concurrency_slots_are_shared_and_expire() {
    let (a, b, prefix) = two_nodes().await;
    let ttl = Duration::from_secs(60);
    let s1 = a.acquire_slot("key", 3, ttl).await.expect("slot 1");
    let _s2 = b.acquire_slot("key", 3, ttl).await.expect("slot 2");
    let _s3 = a.acquire_slot("key", 3, ttl).await.expect("slot 3");
    assert!(
        b.acquire_slot("key", 3, ttl).await.is_none(),
        "a 4th slot across nodes"
    );
    a.release_slot(&s1).await;
    assert!(b.acquire_slot("key", 3, ttl).await.is_some());
    // A node that dies holding a slot: its lease runs out.
    let short = b
        .acquire_slot("other", 1, Duration::from_secs(2))
        .await
        .expect("slot");
    drop(short);
    assert!(a.acquire_slot("other", 1, ttl).await.is_none());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(
        a.acquire_slot("other", 1, ttl).await.is_some(),
        "an expired lease still holds its slot"
    );
    cleanup(&prefix).await;
}

#[tokio::test]
async fn slots_and_holds_of_long_requests_are_renewed_while_held() {
    let (a, b, prefix) = two_nodes().await;
    let day = "2026-11-22";
    let short = Duration::from_millis(1500);
    let limit = limit_of(100);
    // Two requests that outlive their leases: one still running, one dropped without its
    // release (as a panicking request would).
    let running = a.acquire_slot("long", 1, short).await.expect("slot");
    let dropped = a.acquire_slot("lost", 1, short).await.expect("slot");
    let running_hold = a
        .hold_cost("long", day, limit, 100, short)
        .await
        .expect("hold");
    let dropped_hold = a
        .hold_cost("lost", day, limit, 100, short)
        .await
        .expect("hold");
    drop((dropped, dropped_hold));
    // Renewals run by themselves (every quarter of the lifetime); three lifetimes pass.
    tokio::time::sleep(short * 3).await;
    assert!(
        b.acquire_slot("long", 1, short).await.is_none(),
        "a running request's slot ran out"
    );
    assert_eq!(
        b.hold_cost("long", day, limit, 1, short).await,
        Err(CostLimitHit::Daily { in_flight: true }),
        "a running request's hold ran out"
    );
    assert!(
        b.acquire_slot("lost", 1, short).await.is_some(),
        "a dropped lease was kept alive"
    );
    assert!(
        b.hold_cost("lost", day, limit, 1, short).await.is_ok(),
        "a dropped hold was kept alive"
    );
    // Given back, they are no longer renewed: the room comes back at once.
    a.release_slot(&running).await;
    a.settle_cost("long", day, Some(&running_hold), 0).await;
    assert_eq!(a.renew_due().await, 0);
    assert!(b.acquire_slot("long", 1, short).await.is_some());
    assert!(b.hold_cost("long", day, limit, 1, short).await.is_ok());
    cleanup(&prefix).await;
}

#[tokio::test]
async fn usage_counters_of_design_section_9() {
    use llm_relay::store::redis_counters::RedisUsageCounters;
    use relay_filters::{TokenUsage, UsageRecord};
    let prefix = format!("relaytest:{}:", uuid::Uuid::now_v7().simple());
    let link = RedisLink::open(&redis_url()).expect("redis url");
    assert!(link.ready(Duration::from_secs(5)).await);
    let counters = RedisUsageCounters::new(link, &prefix);
    let record = |cost| UsageRecord {
        id: uuid::Uuid::now_v7().to_string(),
        created_at: 1_795_305_600_000, // 2026-11-22
        user_id: Some("u1".into()),
        api_key_id: Some("k1".into()),
        usage: TokenUsage {
            input_tokens: 10,
            output_tokens: 3,
            cache_read_tokens: 7,
            ..Default::default()
        },
        billed_cost: cost,
        ..Default::default()
    };
    counters.book(&record(100)).await.unwrap();
    counters.book(&record(50)).await.unwrap();
    let client = redis::Client::open(redis_url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let get = |k: String, f: &'static str| {
        let mut c = c.clone();
        async move {
            redis::cmd("HGET")
                .arg(k)
                .arg(f)
                .query_async::<i64>(&mut c)
                .await
                .unwrap()
        }
    };
    assert_eq!(get(format!("{prefix}usage:total:u1"), "requests").await, 2);
    assert_eq!(
        get(format!("{prefix}usage:daily:u1:2026-11-22"), "input_tokens").await,
        20
    );
    assert_eq!(
        get(
            format!("{prefix}usage:monthly:u1:2026-11"),
            "cache_read_tokens"
        )
        .await,
        14
    );
    assert_eq!(get(format!("{prefix}usage:apikey:k1"), "cost").await, 150);
    let total: i64 = redis::cmd("GET")
        .arg(format!("{prefix}cost:total:u1"))
        .query_async(&mut c)
        .await
        .unwrap();
    let daily: i64 = redis::cmd("GET")
        .arg(format!("{prefix}cost:daily:u1:2026-11-22"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!((total, daily), (150, 150));
    cleanup(&prefix).await;
}

#[tokio::test]
async fn cost_counters_are_shared_and_seeded() {
    let prefix = format!("relaytest:{}:", uuid::Uuid::now_v7().simple());
    let seeded = Arc::new(MemoryLimits::default());
    // This node knows (from the database) that the key already spent 100 today, 400 this
    // month, 1000 in all.
    seeded.seed_cost("key", "2026-11-22", Spent::new(100, 400, 1000));
    let link = RedisLink::open(&redis_url()).expect("redis url");
    assert!(link.ready(Duration::from_secs(5)).await);
    let a = RedisLimits::new(link.clone(), &prefix, seeded);
    let b = RedisLimits::new(link, &prefix, Arc::new(MemoryLimits::default()));
    a.settle_cost("key", "2026-11-22", None, 5).await;
    b.settle_cost("key", "2026-11-22", None, 7).await;
    assert_eq!(
        a.spent("key", "2026-11-22").await,
        Spent::new(112, 412, 1012)
    );
    assert_eq!(
        b.spent("key", "2026-11-22").await,
        Spent::new(112, 412, 1012)
    );
    cleanup(&prefix).await;
}

fn limit_of(daily: i64) -> CostLimits {
    CostLimits {
        daily: Some(daily),
        ..CostLimits::default()
    }
}

#[tokio::test]
async fn cost_holds_of_requests_in_flight_are_shared_and_expire() {
    let (a, b, prefix) = two_nodes().await;
    let day = "2026-11-22";
    let ttl = Duration::from_secs(60);
    let daily = CostLimits {
        daily: Some(100),
        monthly: None,
        total: Some(1000),
    };
    a.settle_cost("key", day, None, 40).await;
    // 40 spent; node a holds 30, node b 30: the key is at its limit with what is in flight.
    let h1 = a
        .hold_cost("key", day, daily, 30, ttl)
        .await
        .expect("hold 1");
    let h2 = b
        .hold_cost("key", day, daily, 30, ttl)
        .await
        .expect("hold 2");
    assert_eq!(
        a.hold_cost("key", day, daily, 1, ttl).await,
        Err(CostLimitHit::Daily { in_flight: true })
    );
    // Booking h1 at 10 gives its hold back and counts what it cost, on both nodes.
    a.settle_cost("key", day, Some(&h1), 10).await;
    assert_eq!(b.spent("key", day).await, Spent::new(50, 50, 50));
    let h3 = b
        .hold_cost("key", day, daily, 20, ttl)
        .await
        .expect("room again");
    assert_eq!(
        b.hold_cost("key", day, daily, 1, ttl).await,
        Err(CostLimitHit::Daily { in_flight: true })
    );
    b.settle_cost("key", day, Some(&h2), 0).await;
    b.settle_cost("key", day, Some(&h3), 0).await;
    // Spend alone reaches the limit: a lasting refusal, also with a hold in flight.
    let h5 = a
        .hold_cost("key", day, daily, 5, ttl)
        .await
        .expect("hold 5");
    a.settle_cost("key", day, None, 50).await;
    assert_eq!(
        b.hold_cost("key", day, daily, 1, ttl).await,
        Err(CostLimitHit::Daily { in_flight: false })
    );
    a.settle_cost("key", day, Some(&h5), 0).await;
    let total = CostLimits {
        total: Some(150),
        ..CostLimits::default()
    };
    let _h4 = a
        .hold_cost("key", day, total, 50, ttl)
        .await
        .expect("under total");
    assert_eq!(
        b.hold_cost("key", day, total, 1, ttl).await,
        Err(CostLimitHit::Total { in_flight: true })
    );

    // A node that dies holding: its hold runs out, on another key.
    let short = Duration::from_secs(2);
    let limit = limit_of(100);
    let lost = a
        .hold_cost("other", day, limit, 100, short)
        .await
        .expect("hold");
    assert!(!lost.in_memory, "held in Redis: {lost:?}");
    assert!(b.hold_cost("other", day, limit, 1, ttl).await.is_err());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let after = b.hold_cost("other", day, limit, 1, ttl).await;
    assert!(after.is_ok(), "an expired hold still counts: {after:?}");
    cleanup(&prefix).await;
}

#[tokio::test]
async fn cost_holds_fall_back_to_memory_without_redis() {
    // Nothing listens on this port: every operation falls back to the node's own counters.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let link = RedisLink::open(&format!("redis://127.0.0.1:{port}")).expect("redis url");
    let memory = Arc::new(MemoryLimits::default());
    let node = RedisLimits::new(link, "relaytest:down:", memory.clone());
    let day = "2026-11-22";
    let ttl = Duration::from_secs(60);
    let limits = limit_of(100);
    let hold = node
        .hold_cost("key", day, limits, 100, ttl)
        .await
        .expect("hold");
    assert!(hold.in_memory, "held in memory: {hold:?}");
    assert_eq!(
        node.hold_cost("key", day, limits, 1, ttl).await,
        Err(CostLimitHit::Daily { in_flight: true })
    );
    node.settle_cost("key", day, Some(&hold), 30).await;
    assert_eq!(memory.spent("key", day).await, Spent::new(30, 30, 30));
    assert!(node.hold_cost("key", day, limits, 1, ttl).await.is_ok());
}

/// A TCP relay to Redis that, while `slow` is set, holds each answer back longer than a node
/// waits for one: the command runs, its answer comes too late.
async fn slow_redis(slow: Arc<std::sync::atomic::AtomicBool>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = redis_url();
    let target = url
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .expect("host:port")
        .to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                continue;
            };
            let slow = slow.clone();
            let (mut client_rd, mut client_wr) = client.into_split();
            let (mut server_rd, mut server_wr) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_rd, &mut server_wr).await;
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = server_rd.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    if slow.load(std::sync::atomic::Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(600)).await;
                    }
                    if client_wr.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    format!("redis://{addr}")
}

#[tokio::test]
async fn a_hold_and_a_settlement_whose_answers_came_late_count_once() {
    let prefix = format!("relaytest:{}:", uuid::Uuid::now_v7().simple());
    let slow = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A short pause after a failure, so the retries are not refused by it.
    let config = llm_relay::store::RedisLinkConfig {
        retry_interval: Duration::from_millis(100),
        ..Default::default()
    };
    let slow_link =
        RedisLink::open_with(&slow_redis(slow.clone()).await, config).expect("redis url");
    assert!(
        slow_link.ready(Duration::from_secs(5)).await,
        "Redis reachable"
    );
    let node = RedisLimits::new(slow_link, &prefix, Arc::new(MemoryLimits::default()));
    let link = RedisLink::open(&redis_url()).expect("redis url");
    assert!(link.ready(Duration::from_secs(5)).await);
    let other = RedisLimits::new(link, &prefix, Arc::new(MemoryLimits::default()));
    let (day, ttl) = ("2026-11-22", Duration::from_secs(60));

    // Redis takes the hold; its answer is late, so the node holds in memory as well.
    slow.store(true, std::sync::atomic::Ordering::SeqCst);
    let hold = node
        .hold_cost("key", day, limit_of(100), 100, ttl)
        .await
        .expect("held in memory");
    assert!(hold.in_memory, "{hold:?}");
    assert_eq!(
        other.hold_cost("key", day, limit_of(100), 1, ttl).await,
        Err(CostLimitHit::Daily { in_flight: true }),
        "Redis took the hold"
    );
    // After the link's pause, the settlement runs in Redis and its answer is late too; it is
    // retried (after 1 s) once Redis answers in time again, and finds it was done.
    tokio::time::sleep(Duration::from_millis(200)).await;
    node.settle_cost("key", day, Some(&hold), 30).await;
    slow.store(false, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(other.spent("key", day).await, Spent::new(30, 30, 30));
    let after = other.hold_cost("key", day, limit_of(100), 1, ttl).await;
    assert!(after.is_ok(), "the hold outlived its settlement: {after:?}");
    cleanup(&prefix).await;
}

/// The lease TTL of the slot tests: a slot still taken at the end of a bounded wait was not
/// given back, it did not run out.
const LONG_LEASE: Duration = Duration::from_secs(900);

/// A node on Redis through [`slow_redis`], and one on Redis directly, sharing `prefix`.
async fn slow_and_fast_nodes(
    prefix: &str,
    slow: Arc<std::sync::atomic::AtomicBool>,
    memory: Arc<MemoryLimits>,
) -> (RedisLimits, RedisLimits) {
    let slow_link = RedisLink::open(&slow_redis(slow).await).expect("redis url");
    assert!(
        slow_link.ready(Duration::from_secs(5)).await,
        "Redis reachable"
    );
    let link = RedisLink::open(&redis_url()).expect("redis url");
    assert!(link.ready(Duration::from_secs(5)).await, "Redis reachable");
    (
        RedisLimits::new(slow_link, prefix, memory),
        RedisLimits::new(link, prefix, Arc::new(MemoryLimits::default())),
    )
}

/// Whether `node` gets the key's one slot within 40 s (far less than the lease TTL). A release
/// the slow node retries runs 1, 2, 4, 8 and 16 s apart, each refused while its link is marked
/// down after a late answer: on a loaded machine the fourth or fifth try may be the one.
async fn slot_comes_free(node: &RedisLimits, key_id: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(40);
    while Instant::now() < deadline {
        if node.acquire_slot(key_id, 1, LONG_LEASE).await.is_some() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Turns the delay of a [`slow_redis`] on or off.
fn set(flag: &std::sync::atomic::AtomicBool, on: bool) {
    flag.store(on, std::sync::atomic::Ordering::SeqCst);
}

#[tokio::test]
async fn a_slot_whose_answer_came_late_is_given_back_in_redis() {
    let prefix = format!("relaytest:{}:", uuid::Uuid::now_v7().simple());
    let slow = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (node, other) =
        slow_and_fast_nodes(&prefix, slow.clone(), Arc::new(MemoryLimits::default())).await;

    // Redis takes the lease; its answer is late, so the node holds the slot in memory.
    set(&slow, true);
    let lease = node
        .acquire_slot("key", 1, LONG_LEASE)
        .await
        .expect("slot in memory");
    assert!(
        other.acquire_slot("key", 1, LONG_LEASE).await.is_none(),
        "Redis took the lease"
    );
    set(&slow, false);
    node.release_slot(&lease).await;
    assert!(
        slot_comes_free(&other, "key").await,
        "the lease Redis took outlived its request"
    );
    cleanup(&prefix).await;
}

#[tokio::test]
async fn a_lease_redis_took_for_a_slot_refused_in_memory_is_given_back() {
    let prefix = format!("relaytest:{}:", uuid::Uuid::now_v7().simple());
    let slow = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let memory = Arc::new(MemoryLimits::default());
    let (node, other) = slow_and_fast_nodes(&prefix, slow.clone(), memory.clone()).await;
    // The node holds the key's one slot in memory, from a time Redis was away.
    let earlier = memory
        .acquire_slot("key", 1, LONG_LEASE)
        .await
        .expect("slot in memory");

    // Redis, where the slot is free, takes a lease; its answer is late and memory refuses.
    set(&slow, true);
    assert!(node.acquire_slot("key", 1, LONG_LEASE).await.is_none());
    assert!(
        other.acquire_slot("key", 1, LONG_LEASE).await.is_none(),
        "Redis took the lease"
    );
    set(&slow, false);
    assert!(
        slot_comes_free(&other, "key").await,
        "the lease Redis took for a refused request stayed"
    );
    memory.release_slot(&earlier).await;
    cleanup(&prefix).await;
}

#[tokio::test]
async fn a_slot_released_while_redis_is_down_is_given_back_once_it_is_up() {
    let prefix = format!("relaytest:{}:", uuid::Uuid::now_v7().simple());
    let slow = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (node, other) =
        slow_and_fast_nodes(&prefix, slow.clone(), Arc::new(MemoryLimits::default())).await;
    let lease = node
        .acquire_slot("key", 1, LONG_LEASE)
        .await
        .expect("slot in Redis");

    // An answer too late marks the link down (for a second): the release cannot reach Redis.
    set(&slow, true);
    let _ = node.hit_rpm("another key", 1000, 1_000_000).await;
    node.release_slot(&lease).await;
    set(&slow, false);
    assert!(
        slot_comes_free(&other, "key").await,
        "the release made while Redis was down was lost"
    );
    cleanup(&prefix).await;
}

#[tokio::test]
async fn a_request_whose_slot_answer_came_late_frees_its_slot_end_to_end() {
    use common::mock_upstream::MockUpstream;
    let slow = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let redis = slow_redis(slow.clone()).await;
    let mock = MockUpstream::start().await;
    let relay = common::Relay::start_with(common::RelayOptions {
        env: vec![
            ("RELAY_REDIS_URL".to_string(), redis),
            (
                "RELAY_CONCURRENCY_LEASE_TTL".to_string(),
                format!("{}s", LONG_LEASE.as_secs()),
            ),
        ],
        ..Default::default()
    })
    .await;
    relay
        .create_account("claude-a", "claude", &mock.url(), "sk-ant-a")
        .await;
    let user = relay.create_user("one-at-a-time", 10_000).await;
    let (key_id, key) = relay
        .create_key(&user, serde_json::json!({"max_concurrency": 1}))
        .await;
    relay.wait_key_active(&key).await;
    let send = || async {
        let body = common::messages_body(
            "claude-sonnet-4-5",
            false,
            common::conversation("one slot", 1),
        );
        let r = relay
            .post("/v1/messages", &key)
            .json(&body)
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        let _ = r.bytes().await;
        status
    };
    let client = redis::Client::open(redis_url()).expect("client");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("connection");
    // The relay's keys carry no prefix; this test's are the ones of its key and user.
    let slots = format!("limit:slots:{key_id}");
    let usage = format!("usage:apikey:{key_id}");
    // Booked last of a request's cost (after the key's).
    let user_cost = format!("cost:user:total:{user}");
    let exists = |k: String| {
        let mut c = c.clone();
        async move {
            redis::cmd("EXISTS")
                .arg(k)
                .query_async::<i64>(&mut c)
                .await
                .expect("EXISTS")
                == 1
        }
    };

    // A first request connects the relay to Redis; its usage counters and cost are booked
    // apart, and must be in before Redis slows down (a late answer there would keep the slot
    // off Redis).
    assert_eq!(send().await, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !exists(usage.clone()).await || !exists(user_cost.clone()).await {
        assert!(Instant::now() < deadline, "usage counters never booked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The slot's lease is taken in Redis while its answer comes too late.
    set(&slow, true);
    assert_eq!(send().await, 200, "served while Redis answers late");
    assert!(exists(slots.clone()).await, "Redis took the lease");
    set(&slow, false);
    // Until the relay finds Redis answering again, it counts slots in memory, where this one
    // is free: wait for that first.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ready = relay
            .http
            .get(format!("{}/readyz", relay.admin))
            .send()
            .await
            .expect("readyz");
        if ready.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the relay never found Redis again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The next request is served at once, not after the lease's TTL.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut statuses = Vec::new();
    loop {
        let status = send().await;
        statuses.push(status);
        if status == 200 {
            break;
        }
        assert!(
            status == 429 && Instant::now() < deadline,
            "the key's slot stayed taken: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for pattern in [format!("*{key_id}*"), format!("*{user}*")] {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut c)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<i64, _> = redis::cmd("DEL").arg(keys).query_async(&mut c).await;
        }
    }
}
