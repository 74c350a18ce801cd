//! Per-key limits in Redis are shared by nodes: two limit stores on one Redis (two nodes) see
//! one rpm budget, one set of concurrency slots and one cost counter; a slot a dead node never
//! gave back frees itself.

use std::sync::Arc;
use std::time::Duration;

use llm_relay::store::redis_limits::RedisLimits;
use llm_relay::store::RedisLink;
use relay_filters::key_limits::{CostLimitHit, CostLimits, LimitStore, MemoryLimits};

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
    // This node knows (from the database) that the key already spent 100 today, 1000 in all.
    seeded.seed_cost("key", "2026-11-22", 100, 1000);
    let link = RedisLink::open(&redis_url()).expect("redis url");
    assert!(link.ready(Duration::from_secs(5)).await);
    let a = RedisLimits::new(link.clone(), &prefix, seeded);
    let b = RedisLimits::new(link, &prefix, Arc::new(MemoryLimits::default()));
    a.settle_cost("key", "2026-11-22", None, 5).await;
    b.settle_cost("key", "2026-11-22", None, 7).await;
    assert_eq!(a.spent("key", "2026-11-22").await, (112, 1012));
    assert_eq!(b.spent("key", "2026-11-22").await, (112, 1012));
    cleanup(&prefix).await;
}

fn limit_of(daily: i64) -> CostLimits {
    CostLimits {
        daily: Some(daily),
        total: None,
    }
}

#[tokio::test]
async fn cost_holds_of_requests_in_flight_are_shared_and_expire() {
    let (a, b, prefix) = two_nodes().await;
    let day = "2026-11-22";
    let ttl = Duration::from_secs(60);
    let daily = CostLimits {
        daily: Some(100),
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
    assert_eq!(b.spent("key", day).await, (50, 50));
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
        daily: None,
        total: Some(150),
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
    assert_eq!(memory.spent("key", day).await, (30, 30));
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
    assert_eq!(other.spent("key", day).await, (30, 30));
    let after = other.hold_cost("key", day, limit_of(100), 1, ttl).await;
    assert!(after.is_ok(), "the hold outlived its settlement: {after:?}");
    cleanup(&prefix).await;
}
