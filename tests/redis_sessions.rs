//! Integration tests of the Redis session store, its memory fallback and the shared cooldowns.
//!
//! Most tests use the Redis at `RELAY_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`), each
//! under its own `relaytest:{uuid}:` key prefix whose keys are deleted afterwards. The outage
//! test starts a private `redis-server` on a free port, kills it and starts it again; the
//! end-to-end test runs the relay binary with `RELAY_REDIS_URL` set.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

mod common;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::FutureExt;
use llm_relay::metrics::metrics;
use llm_relay::store::{
    FallbackSessionStore, RedisCooldowns, RedisLink, RedisLinkConfig, RedisSessionStore,
};
use redis::aio::MultiplexedConnection;
use relay_filters::session_store::{Binding, MemorySessionStore, SessionStore};

fn redis_url() -> String {
    std::env::var("RELAY_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap())
        .unwrap()
}

fn binding(account: &str) -> Binding {
    Binding {
        account_id: account.into(),
        account_type: "claude".into(),
        platform: "claude".into(),
        model: Some("claude-sonnet-4".into()),
        user_id: "u1".into(),
        api_key_id: "k1".into(),
        created_at: 1_700_000_000_000,
        last_used_at: 1_700_000_000_000,
        request_count: 1,
    }
}

/// What a test body gets: a connected link, its key prefix and a direct connection to look
/// at Redis behind the store's back.
struct Env {
    link: Arc<RedisLink>,
    prefix: String,
    direct: MultiplexedConnection,
}

impl Env {
    fn sessions(&self) -> RedisSessionStore {
        RedisSessionStore::new(self.link.clone(), &self.prefix)
    }
}

async fn direct_connection(url: &str) -> redis::RedisResult<MultiplexedConnection> {
    redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await
}

/// Runs `body` under a fresh key prefix, then deletes the prefix's keys (even when the body
/// panicked) and re-raises the body's panic.
async fn run<F, Fut>(body: F)
where
    F: FnOnce(Env) -> Fut,
    Fut: Future<Output = ()>,
{
    let url = redis_url();
    let prefix = format!("relaytest:{}:", uuid::Uuid::now_v7());
    let link = RedisLink::open(&url).unwrap();
    assert!(
        link.ready(Duration::from_secs(5)).await,
        "no Redis at {url} (set RELAY_TEST_REDIS_URL)"
    );
    let direct = direct_connection(&url).await.unwrap();
    cleaned_up(
        &prefix,
        body(Env {
            link,
            prefix: prefix.clone(),
            direct,
        }),
    )
    .await;
}

/// Runs `body`, then deletes the keys starting with `prefix` (even when the body panicked)
/// and re-raises the body's panic.
async fn cleaned_up(prefix: &str, body: impl Future<Output = ()>) {
    let direct = direct_connection(&redis_url()).await.unwrap();
    let outcome = AssertUnwindSafe(body).catch_unwind().await;
    delete_prefix(direct, prefix).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn delete_prefix(mut conn: MultiplexedConnection, prefix: &str) {
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL")
                .arg(keys)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
}

/// Polls `check` every 20 ms until it holds; panics with `what` after `within`.
async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn get_put_delete_round_trip() {
    run(|mut env| async move {
        let store = env.sessions();
        let ttl = Duration::from_secs(60);
        assert!(store.get("s1").await.unwrap().is_none());

        store.put("s1", &binding("a"), ttl).await.unwrap();
        let got = store.get("s1").await.unwrap().unwrap();
        assert_eq!(*got.binding, binding("a"));
        assert!(got.remaining <= ttl && got.remaining > Duration::from_secs(55));

        // The value is the binding as JSON under the key of DESIGN §7, with a TTL.
        let key = format!("{}session:binding:s1", env.prefix);
        let raw: String = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut env.direct)
            .await
            .unwrap();
        let parsed: Binding = serde_json::from_str(&raw).unwrap();
        assert_eq!(parsed, binding("a"));
        let pttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut env.direct)
            .await
            .unwrap();
        assert!(pttl > 55_000 && pttl <= 60_000, "{pttl}");

        store.put("s1", &binding("b"), ttl).await.unwrap();
        assert_eq!(
            store.get("s1").await.unwrap().unwrap().binding.account_id,
            "b"
        );

        store.delete("s1").await.unwrap();
        assert!(store.get("s1").await.unwrap().is_none());
        let exists: i64 = redis::cmd("EXISTS")
            .arg(&key)
            .query_async(&mut env.direct)
            .await
            .unwrap();
        assert_eq!(exists, 0);

        // The api_key strategy's session key gives `session:binding:apikey:{id}:{protocol}`.
        store
            .put("apikey:key-7:anthropic", &binding("a"), ttl)
            .await
            .unwrap();
        let exists: i64 = redis::cmd("EXISTS")
            .arg(format!(
                "{}session:binding:apikey:key-7:anthropic",
                env.prefix
            ))
            .query_async(&mut env.direct)
            .await
            .unwrap();
        assert_eq!(exists, 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn set_if_absent_race_has_one_winner() {
    run(|env| async move {
        // Four links (four connections), as if four nodes raced for the same session.
        let mut stores = Vec::new();
        for _ in 0..4 {
            let link = RedisLink::open(&redis_url()).unwrap();
            assert!(link.ready(Duration::from_secs(5)).await);
            stores.push(Arc::new(RedisSessionStore::new(link, &env.prefix)));
        }
        let ttl = Duration::from_secs(60);
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let store = stores[i % stores.len()].clone();
                tokio::spawn(async move {
                    store
                        .set_if_absent("race", &binding(&format!("acct-{i}")), ttl)
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut winners = Vec::new();
        for t in tasks {
            winners.push(t.await.unwrap());
        }
        let first = winners[0].clone();
        assert!(winners.iter().all(|w| *w == first), "{winners:?}");
        assert!(first.account_id.starts_with("acct-"));
        let stored = env.sessions().get("race").await.unwrap().unwrap();
        assert_eq!(*stored.binding, first);

        // A later contender gets the winner too, until the binding expires.
        let store = env.sessions();
        assert_eq!(
            store
                .set_if_absent("race", &binding("late"), ttl)
                .await
                .unwrap(),
            first
        );
        store
            .put("short", &binding("old"), Duration::from_millis(50))
            .await
            .unwrap();
        eventually(Duration::from_secs(5), "the binding to expire", || {
            let store = &store;
            async move { store.get("short").await.unwrap().is_none() }
        })
        .await;
        assert_eq!(
            store
                .set_if_absent("short", &binding("new"), ttl)
                .await
                .unwrap()
                .account_id,
            "new"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moving_a_conversation_has_one_winner_and_renewals_never_move_it_back() {
    run(|mut env| async move {
        let ttl = Duration::from_secs(60);
        let store = env.sessions();
        store.put("conv", &binding("failed"), ttl).await.unwrap();
        // Twenty requests on four nodes find the conversation's account failed at once and
        // each moves it to the account it picked: all end on the first mover's.
        let mut stores = Vec::new();
        for _ in 0..4 {
            let link = RedisLink::open(&redis_url()).unwrap();
            assert!(link.ready(Duration::from_secs(5)).await);
            stores.push(Arc::new(RedisSessionStore::new(link, &env.prefix)));
        }
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let store = stores[i % stores.len()].clone();
                tokio::spawn(async move {
                    store
                        .replace("conv", "failed", &binding(&format!("acct-{i}")), ttl)
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut held = Vec::new();
        for t in tasks {
            held.push(t.await.unwrap());
        }
        let first = held[0].clone();
        assert!(held.iter().all(|h| *h == first), "{held:?}");
        assert!(first.account_id.starts_with("acct-"), "{first:?}");
        assert_eq!(*store.get("conv").await.unwrap().unwrap().binding, first);

        // A renewal read before the move (still naming `failed`) does not bring it back.
        let mut stale = binding("failed");
        stale.request_count = 9;
        assert_eq!(
            store.replace("conv", "failed", &stale, ttl).await.unwrap(),
            first
        );
        // A renewal on the account that holds it is stored, with its new lifetime.
        let mut renewed = first.clone();
        renewed.request_count = 2;
        store
            .replace(
                "conv",
                &first.account_id,
                &renewed,
                Duration::from_secs(600),
            )
            .await
            .unwrap();
        let got = store.get("conv").await.unwrap().unwrap();
        assert_eq!(got.binding.request_count, 2);
        assert!(
            got.remaining > Duration::from_secs(500),
            "{:?}",
            got.remaining
        );

        // Nothing bound, or a value that is no binding: stored.
        assert_eq!(
            store
                .replace("fresh", "x", &binding("n"), ttl)
                .await
                .unwrap()
                .account_id,
            "n"
        );
        let _: () = redis::cmd("SET")
            .arg(format!("{}session:binding:junk", env.prefix))
            .arg("{\"not\":\"a binding\"}")
            .query_async(&mut env.direct)
            .await
            .unwrap();
        assert_eq!(
            store
                .replace("junk", "x", &binding("j"), ttl)
                .await
                .unwrap()
                .account_id,
            "j"
        );
        assert_eq!(
            store.get("junk").await.unwrap().unwrap().binding.account_id,
            "j"
        );
    })
    .await;
}

#[tokio::test]
async fn sliding_ttl_shows_in_remaining() {
    run(|env| async move {
        let store = env.sessions();
        store
            .set_if_absent("slide", &binding("a"), Duration::from_secs(2))
            .await
            .unwrap();
        let before = store.get("slide").await.unwrap().unwrap().remaining;
        assert!(before <= Duration::from_secs(2) && before > Duration::ZERO);

        // What the scheduler does on a hit under the renew threshold: put with a fresh TTL.
        let mut renewed = Binding::clone(&store.get("slide").await.unwrap().unwrap().binding);
        renewed.request_count += 1;
        store
            .put("slide", &renewed, Duration::from_secs(3600))
            .await
            .unwrap();
        let after = store.get("slide").await.unwrap().unwrap();
        assert!(after.remaining > Duration::from_secs(3500));
        assert_eq!(after.binding.request_count, 2);

        // A binding left alone runs out.
        store
            .put("idle", &binding("a"), Duration::from_secs(2))
            .await
            .unwrap();
        let left = store.get("idle").await.unwrap().unwrap().remaining;
        assert!(left <= Duration::from_secs(2));
        eventually(
            Duration::from_secs(10),
            "the idle binding to expire",
            || {
                let store = &store;
                async move { store.get("idle").await.unwrap().is_none() }
            },
        )
        .await;
    })
    .await;
}

#[tokio::test]
async fn cooldowns_keep_the_later_value_and_expire() {
    run(|mut env| async move {
        let cooldowns = RedisCooldowns::new(env.link.clone(), &env.prefix);
        let now = now_ms();
        let ids = vec!["a1".to_string(), "a2".to_string(), "none".to_string()];

        assert_eq!(
            cooldowns.publish("a1", now + 60_000, now).await.unwrap(),
            now + 60_000
        );
        // An earlier cooldown does not shorten the one in force.
        assert_eq!(
            cooldowns.publish("a1", now + 5_000, now).await.unwrap(),
            now + 60_000
        );
        let all = cooldowns.fetch_all(&ids).await;
        assert_eq!(all.get("a1"), Some(&(now + 60_000)));
        assert!(!all.contains_key("none"));
        // A later one replaces it, and the key lives until it ends.
        assert_eq!(
            cooldowns.publish("a1", now + 90_000, now).await.unwrap(),
            now + 90_000
        );
        let pttl: i64 = redis::cmd("PTTL")
            .arg(format!("{}account:cooldown:a1", env.prefix))
            .query_async(&mut env.direct)
            .await
            .unwrap();
        assert!(pttl > 80_000 && pttl <= 90_000, "{pttl}");

        // A cooldown already over is not published.
        cooldowns.publish("a2", now - 1, now).await.unwrap();
        assert!(!cooldowns.fetch_all(&ids).await.contains_key("a2"));

        // A short one disappears when it ends.
        cooldowns
            .publish("a2", now_ms() + 2000, now_ms())
            .await
            .unwrap();
        assert!(cooldowns.fetch_all(&ids).await.contains_key("a2"));
        eventually(Duration::from_secs(10), "the cooldown to expire", || {
            let (cooldowns, ids) = (&cooldowns, &ids);
            async move { !cooldowns.fetch_all(ids).await.contains_key("a2") }
        })
        .await;
        assert!(cooldowns.fetch_all(&[]).await.is_empty());

        // An operator's clear ends the cooldown; one observed before it (its publish late)
        // does not come back, one observed after it does.
        cooldowns.clear("a1").await.unwrap();
        assert!(!cooldowns.fetch_all(&ids).await.contains_key("a1"));
        let late = cooldowns
            .publish("a1", now_ms() + 60_000, now)
            .await
            .unwrap();
        assert_eq!(late, 0, "nothing in force");
        assert!(!cooldowns.fetch_all(&ids).await.contains_key("a1"));
        let later = now_ms() + 1;
        let until = now_ms() + 60_000;
        assert_eq!(cooldowns.publish("a1", until, later).await.unwrap(), until);
        assert_eq!(cooldowns.fetch_all(&ids).await.get("a1"), Some(&until));
    })
    .await;
}

/// A `redis-server` of this test only, on loopback, without persistence; killed on drop.
struct PrivateRedis {
    child: Child,
}

impl PrivateRedis {
    async fn start(port: u16) -> PrivateRedis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        let server = PrivateRedis { child };
        let url = format!("redis://127.0.0.1:{port}");
        eventually(
            Duration::from_secs(10),
            "redis-server to answer PING",
            || {
                let url = url.clone();
                async move {
                    let ping = async {
                        let mut conn = direct_connection(&url).await?;
                        redis::cmd("PING").query_async::<String>(&mut conn).await
                    };
                    matches!(
                        tokio::time::timeout(Duration::from_millis(500), ping).await,
                        Ok(Ok(_))
                    )
                }
            },
        )
        .await;
        server
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether the store's `probe` write reaches Redis (rather than only memory).
async fn writes_reach_redis(store: &FallbackSessionStore, url: &str, prefix: &str) -> bool {
    if store
        .put("probe", &binding("p"), Duration::from_secs(60))
        .await
        .is_err()
    {
        return false;
    }
    let Ok(mut conn) = direct_connection(url).await else {
        return false;
    };
    let exists: redis::RedisResult<i64> = redis::cmd("EXISTS")
        .arg(format!("{prefix}session:binding:probe"))
        .query_async(&mut conn)
        .await;
    let _: redis::RedisResult<()> = redis::cmd("DEL")
        .arg(format!("{prefix}session:binding:probe"))
        .query_async(&mut conn)
        .await;
    exists == Ok(1)
}

#[tokio::test]
async fn falls_back_to_memory_while_redis_is_down() {
    let port = common::restartable_port();
    let url = format!("redis://127.0.0.1:{port}");
    let prefix = "fallback:";
    let link = RedisLink::open_with(
        &url,
        RedisLinkConfig {
            op_timeout: Duration::from_millis(250),
            connect_timeout: Duration::from_millis(500),
            retry_interval: Duration::from_millis(100),
        },
    )
    .unwrap();
    let store = FallbackSessionStore::new(
        RedisSessionStore::new(link, prefix),
        MemorySessionStore::new(1000),
    );
    let ttl = Duration::from_secs(60);
    let fallbacks = || metrics().session_store_fallback.get();

    // No Redis yet: building the store did not wait, and every operation is served by memory.
    let before = fallbacks();
    let started = Instant::now();
    assert_eq!(
        store
            .set_if_absent("s1", &binding("a"), ttl)
            .await
            .unwrap()
            .account_id,
        "a"
    );
    assert_eq!(
        store.get("s1").await.unwrap().unwrap().binding.account_id,
        "a"
    );
    store.put("s2", &binding("b"), ttl).await.unwrap();
    store.delete("s2").await.unwrap();
    assert!(store.get("s2").await.unwrap().is_none());
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(fallbacks() >= before + 5);
    assert!(store.is_degraded());

    // Redis comes up: the store switches to it by itself.
    let mut server = PrivateRedis::start(port).await;
    eventually(Duration::from_secs(10), "the store to use Redis", || {
        writes_reach_redis(&store, &url, prefix)
    })
    .await;
    assert!(!store.is_degraded());
    // Bindings made in memory during the outage were not replayed to Redis.
    assert!(store.get("s1").await.unwrap().is_none());
    store.set_if_absent("s1", &binding("b"), ttl).await.unwrap();
    let mut direct = direct_connection(&url).await.unwrap();
    let raw: String = redis::cmd("GET")
        .arg(format!("{prefix}session:binding:s1"))
        .query_async(&mut direct)
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Binding>(&raw).unwrap().account_id,
        "b"
    );
    // A conversation another node bound, which this node has read since.
    let _: () = redis::cmd("SET")
        .arg(format!("{prefix}session:binding:s6"))
        .arg(serde_json::to_string(&binding("f")).unwrap())
        .arg("PX")
        .arg(60_000)
        .query_async(&mut direct)
        .await
        .unwrap();
    assert_eq!(
        store.get("s6").await.unwrap().unwrap().binding.account_id,
        "f"
    );

    // Redis dies: operations keep succeeding from memory, which mirrored the Redis writes
    // and the bindings read there.
    server.stop();
    let before = fallbacks();
    let started = Instant::now();
    assert_eq!(
        store.get("s1").await.unwrap().unwrap().binding.account_id,
        "b"
    );
    store.put("s3", &binding("c"), ttl).await.unwrap();
    assert_eq!(
        store
            .set_if_absent("s4", &binding("d"), ttl)
            .await
            .unwrap()
            .account_id,
        "d"
    );
    assert_eq!(
        store.get("s3").await.unwrap().unwrap().binding.account_id,
        "c"
    );
    assert_eq!(
        store.get("s6").await.unwrap().unwrap().binding.account_id,
        "f",
        "a binding read from Redis before the outage stays"
    );
    store.delete("s4").await.unwrap();
    assert!(store.get("s4").await.unwrap().is_none());
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(fallbacks() >= before + 6, "{} -> {}", before, fallbacks());
    assert!(store.is_degraded());

    // Redis is back on the same port: the store uses it again.
    let _server = PrivateRedis::start(port).await;
    eventually(
        Duration::from_secs(10),
        "the store to use Redis again",
        || writes_reach_redis(&store, &url, prefix),
    )
    .await;
    assert!(!store.is_degraded());
    // The fresh server is empty and reads come from it, not from memory.
    assert!(store.get("s3").await.unwrap().is_none());
    store.put("s5", &binding("e"), ttl).await.unwrap();
    let mut direct = direct_connection(&url).await.unwrap();
    let exists: i64 = redis::cmd("EXISTS")
        .arg(format!("{prefix}session:binding:s5"))
        .query_async(&mut direct)
        .await
        .unwrap();
    assert_eq!(exists, 1);
}

#[tokio::test]
async fn first_operation_after_start_up_uses_redis() {
    run(|mut env| async move {
        // A fresh link: nothing connected yet, as right after the relay starts.
        let link = RedisLink::open(&redis_url()).unwrap();
        assert!(!link.is_connected());
        let store = FallbackSessionStore::new(
            RedisSessionStore::new(link, &env.prefix),
            MemorySessionStore::new(10),
        );
        store
            .put("first", &binding("a"), Duration::from_secs(60))
            .await
            .unwrap();
        assert!(!store.is_degraded());
        let exists: i64 = redis::cmd("EXISTS")
            .arg(format!("{}session:binding:first", env.prefix))
            .query_async(&mut env.direct)
            .await
            .unwrap();
        assert_eq!(exists, 1);
    })
    .await;
}

#[tokio::test]
async fn a_silent_redis_costs_one_timeout_per_retry_interval() {
    // Accepts connections (the kernel does) but never answers, like a hung server.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://{}", silent.local_addr().unwrap());
    let link = RedisLink::open_with(
        &url,
        RedisLinkConfig {
            op_timeout: Duration::from_millis(250),
            connect_timeout: Duration::from_millis(500),
            retry_interval: Duration::from_secs(30),
        },
    )
    .unwrap();
    let store = FallbackSessionStore::new(
        RedisSessionStore::new(link, "silent:"),
        MemorySessionStore::new(10),
    );
    let ttl = Duration::from_secs(60);

    let started = Instant::now();
    store.put("s", &binding("a"), ttl).await.unwrap();
    let first = started.elapsed();
    assert!(
        first >= Duration::from_millis(200) && first < Duration::from_secs(1),
        "{first:?}"
    );
    assert!(store.is_degraded());

    // Marked down: the next operations go straight to memory.
    let started = Instant::now();
    for _ in 0..10 {
        assert_eq!(
            store.get("s").await.unwrap().unwrap().binding.account_id,
            "a"
        );
    }
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
}

/// A relay on the test Redis with one account (`account`) on a mock upstream and one user
/// (`user`) with an active key: the mock, the relay, the account id, the key id and the key.
async fn relay_on_redis(
    user: &str,
    account: &str,
) -> (
    common::mock_upstream::MockUpstream,
    common::Relay,
    String,
    String,
    String,
) {
    let mock = common::mock_upstream::MockUpstream::start().await;
    let relay = common::Relay::start_with(common::RelayOptions {
        env: vec![
            ("RELAY_REDIS_URL".into(), redis_url()),
            // A loaded machine must not pass for an unreachable Redis.
            ("RELAY_REDIS_OP_TIMEOUT".into(), "2s".into()),
        ],
        ..common::RelayOptions::default()
    })
    .await;
    let user_id = relay.create_user(user, 10_000).await;
    let account_id = relay
        .create_account(account, "claude", &mock.url(), "sk-ant-upstream-secret")
        .await;
    let (key_id, key) = relay.create_key(&user_id, serde_json::json!({})).await;
    relay.wait_key_active(&key).await;
    (mock, relay, account_id, key_id, key)
}

#[tokio::test]
async fn the_relay_binds_sessions_in_redis() {
    use common::{conversation, messages_body};

    let (_mock, relay, account_id, key_id, key) = relay_on_redis("alice", "claude-a").await;

    // The relay writes unprefixed keys; the key id (a fresh uuid) keeps them apart from others.
    let pattern = format!("session:binding:{key_id}:");
    cleaned_up(&pattern, async {
        let mut direct = direct_connection(&redis_url()).await.unwrap();
        let body = messages_body("claude-sonnet-4-5", false, conversation("redis", 1));
        let r = relay
            .post("/v1/messages", &key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{pattern}*"))
            .query_async(&mut direct)
            .await
            .unwrap();
        assert_eq!(keys.len(), 1, "{keys:?}");
        let raw: String = redis::cmd("GET")
            .arg(&keys[0])
            .query_async(&mut direct)
            .await
            .unwrap();
        let bound: Binding = serde_json::from_str(&raw).unwrap();
        assert_eq!(bound.account_id, account_id);
        assert_eq!(bound.api_key_id, key_id);
    })
    .await;
}

#[tokio::test]
async fn bindings_are_listed_page_by_page_under_the_stores_own_prefix() {
    run(|env| async move {
        let store = env.sessions();
        let ttl = Duration::from_secs(60);
        for i in 0..25 {
            store
                .put(&format!("k{i:02}"), &binding(&format!("a{i}")), ttl)
                .await
                .unwrap();
        }
        // A store whose prefix holds glob characters lists its own keys only.
        let plain = RedisSessionStore::new(env.link.clone(), &format!("{}a:", env.prefix));
        plain.put("other", &binding("x"), ttl).await.unwrap();
        let globby = RedisSessionStore::new(env.link.clone(), &format!("{}[ab]:", env.prefix));
        assert!(globby.list(None, 100).await.unwrap().items.is_empty());
        // A key of another type under the prefix is none of the store's: left out, no error.
        let mut direct = env.direct.clone();
        let _: () = redis::cmd("HSET")
            .arg(format!("{}session:binding:a-hash", env.prefix))
            .arg("f")
            .arg("v")
            .query_async(&mut direct)
            .await
            .unwrap();

        let mut seen = std::collections::BTreeMap::new();
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            let page = store.list(cursor.as_deref(), 10).await.unwrap();
            pages += 1;
            for (key, stored) in page.items {
                assert!(stored.remaining > Duration::from_secs(50), "{key}");
                seen.insert(key, stored.binding.account_id.clone());
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
            assert!(pages < 50, "the pages never end");
        }
        assert_eq!(seen.len(), 25, "{seen:?}");
        assert_eq!(seen["k07"], "a7");
        assert!(!seen.contains_key("other"));
        assert!(store.list(Some("not-a-cursor"), 10).await.is_err());
    })
    .await;
}

#[tokio::test]
async fn operators_see_and_end_bindings_held_in_redis() {
    use common::{conversation, messages_body};

    let (_mock, relay, _, key_id, key) = relay_on_redis("olga", "claude-r").await;
    let pattern = format!("session:binding:{key_id}:");
    cleaned_up(&pattern, async {
        let body = messages_body("claude-sonnet-4-5", false, conversation("listed", 1));
        let r = relay
            .post("/v1/messages", &key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        // Other tests' bindings share this Redis: page through all of them for ours.
        let mut ours = Vec::new();
        let mut cursor = String::new();
        for _ in 0..1000 {
            let v = relay
                .admin_get(&format!("/api/admin/sessions?limit=500&cursor={cursor}"))
                .await;
            assert_eq!(v["store"], "redis", "{v}");
            ours.extend(
                v["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|s| s["api_key_id"] == key_id.as_str())
                    .cloned(),
            );
            match v["next_cursor"].as_str() {
                Some(c) => cursor = c.to_string(),
                None => break,
            }
        }
        assert_eq!(ours.len(), 1, "{ours:?}");
        assert_eq!(ours[0]["account_name"], "claude-r");
        assert_eq!(ours[0]["username"], "olga");
        let session_key = ours[0]["session_key"].as_str().unwrap().to_string();
        assert!(
            session_key.starts_with(&format!("{key_id}:")),
            "{session_key}"
        );
        let (status, v) = relay
            .admin_delete(&format!("/api/admin/sessions/{session_key}"))
            .await;
        assert_eq!(status, 200, "{v}");
        let mut conn = direct_connection(&redis_url()).await.unwrap();
        let left: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{pattern}*"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(left.is_empty(), "{left:?}");
        let (status, text) = relay
            .token_call(
                Some(common::ADMIN_TOKEN),
                reqwest::Method::GET,
                "/api/admin/sessions?cursor=x",
                None,
            )
            .await;
        assert_eq!(status, 400, "{text}");
    })
    .await;
}

/// With Redis configured and unreachable, the operators' view says so (503) instead of
/// passing this node's memory off as every node's bindings, or an unbind off as done.
#[tokio::test]
async fn the_sessions_view_says_when_redis_is_unreachable() {
    let port = common::restartable_port();
    let mut server = PrivateRedis::start(port).await;
    let relay = common::Relay::start_with(common::RelayOptions {
        env: vec![(
            "RELAY_REDIS_URL".into(),
            format!("redis://127.0.0.1:{port}"),
        )],
        ..common::RelayOptions::default()
    })
    .await;
    let v = relay.admin_get("/api/admin/sessions").await;
    assert_eq!(v["store"], "redis", "{v}");
    server.stop();
    for (method, path) in [
        (reqwest::Method::GET, "/api/admin/sessions"),
        (reqwest::Method::DELETE, "/api/admin/sessions/some-key"),
    ] {
        let (status, text) = relay
            .token_call(Some(common::ADMIN_TOKEN), method.clone(), path, None)
            .await;
        assert_eq!(status, 503, "{method} {path}: {text}");
        assert!(text.contains("\"unavailable\""), "{text}");
    }
}
